import os, sys, gzip, shutil, glob, json
sys.path.insert(0, "/work/exp")
import numpy as np, phantoms, model
root = "/tmp/ref"
phantoms.make_demo_data(f"{root}/data", subjects=3, shape=(16, 16, 12), seed=5)
# a 1,2,4 model of HEAD (46624b2), subpixel_NN (per-axis strides, ICNR), exported
argv = ["-data_path", f"{root}/data", "-checkpoint_dir", f"{root}/ckpt124", "-epochs", "1",
        "-volume_shape", "16,16,16", "-patch_shape", "8,8,8", "-patch_margin", "0",
        "-upsampling_factor", "1,2,4", "-residual_blocks", "1", "-feature_size", "4"]
assert model.main(argv) == 0
assert model.main(["-export", f"{root}/x124_46624b2.keras", "-checkpoint_dir_restore", f"{root}/ckpt124"]) == 0
# a fixed LR input and the outputs HEAD's code gives: of the exported file, and of the 9a6130d checkpoint
import keras, networks, checkpoints
lr = np.random.default_rng(7).uniform(-1, 1, (1, 6, 5, 4, 1)).astype(np.float32)
g = keras.saving.load_model(f"{root}/x124_46624b2.keras")
np.save(f"{root}/x124_46624b2_sr.npy", g(lr, training=False).numpy())
old = f"{root}/9a6130d"
shutil.copytree("/work/exp/tests/data/checkpoints/9a6130d", old)
for p in glob.glob(old + "/*.gz"):
    with gzip.open(p) as s, open(p[:-3], "wb") as d: shutil.copyfileobj(s, d)
    os.remove(p)
cfg = json.load(open(old + "/config.json"))
g2 = networks.build_generator(cfg["upsampling_factor"], cfg["residual_blocks"], cfg["feature_size"], cfg["upsampling_mode"])
checkpoints.restore_generator(g2, old)
np.save(f"{root}/9a6130d_sr.npy", g2(lr, training=False).numpy())
np.save(f"{root}/lr.npy", lr)
print("ok", os.path.getsize(f"{root}/x124_46624b2.keras"))
