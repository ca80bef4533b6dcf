"""Rewrites a checkpoint with its large tensors (> LIMIT values, the discriminator's) zeroed: same keys, shapes, dtypes, object graph."""
import sys

import numpy as np
import tensorflow as tf

LIMIT = 20000
src, dst = sys.argv[1], sys.argv[2]
r = tf.train.load_checkpoint(src)
dtypes = r.get_variable_to_dtype_map()
names, values = [], []
for name in sorted(dtypes):
    v = r.get_tensor(name)
    if isinstance(v, np.ndarray) and v.size > LIMIT:
        v = np.zeros_like(v)
    names.append(name)
    values.append(tf.constant(v, dtype=dtypes[name]))
tf.raw_ops.SaveV2(prefix=dst, tensor_names=names, shape_and_slices=[""] * len(names), tensors=values)
print("zeroed", sum(1 for n in names if np.size(r.get_tensor(n)) > LIMIT), "of", len(names))
