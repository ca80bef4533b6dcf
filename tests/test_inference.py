"""Inference tests: BIDS/CSV data end to end, BIDS derivatives, -blend/-tta, resumable evaluation."""

import csv
import gc
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf
from helpers import ROOT, TINY, Log

import checkpoints
import degradation
import durable
import errors
import evaluation
import folders
import inference
import layouts
import metrics
import model
import networks
import phantoms
import scans
import splits
import super_resolve
import train_dataset as td
import utils
import version
from outputs import BidsOutputs, bids_stem

SHAPE = (34, 30, 26)


def _phantoms(n, seed):
    """n (image int16, mask uint8, affine) phantoms from make_demo_data, read back."""
    folder = f"/tmp/phantoms-{os.getpid()}-{seed}-{n}"
    if not os.path.isdir(folder):
        phantoms.make_demo_data(folder, subjects=n, shape=SHAPE, seed=seed)
    out = []
    for i in range(n):
        image = nib.load(os.path.join(folder, f"demo_{i:03d}", layouts.IMAGE_NAME))
        mask = nib.load(os.path.join(folder, f"demo_{i:03d}", layouts.MASK_NAME))
        out.append((np.asarray(image.dataobj), np.asarray(mask.dataobj), image.affine))
    return out


def _save(path, data, affine, dtype=np.int16):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    utils.save_nifti(str(path), data, affine, dtype=dtype)
    return str(path)


def _bids_dataset(root):
    """Two subjects, sub-01 with two sessions; skull-stripped images are desc-brain.

    sub-02 also holds its raw T1w (so -bids_filter desc-brain is needed) and
    a desc-brain mask.
    """
    phantoms = _phantoms(3, seed=4)
    os.makedirs(root)
    (root / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.9.0"}')
    for (image, mask, affine), folder, stem in zip(
            phantoms, ["sub-01/ses-1/anat", "sub-01/ses-2/anat", "sub-02/anat"],
            ["sub-01_ses-1", "sub-01_ses-2", "sub-02"]):
        _save(root / folder / f"{stem}_desc-brain_T1w.nii.gz", image, affine)
    image, mask, affine = phantoms[2]
    _save(root / "sub-02/anat/sub-02_T1w.nii.gz", image + 50, affine)
    _save(root / "sub-02/anat/sub-02_desc-brain_mask.nii.gz", mask, affine, dtype=np.uint8)
    return root


@pytest.fixture(scope="module")
def bids_run(tmp_path_factory):
    """One epoch on a tiny BIDS dataset (2 train subject-sessions, sub-02 for test)."""
    base = tmp_path_factory.mktemp("bids_run")
    data = _bids_dataset(base / "bids")
    ckpt = base / "ckpt"
    # The layout is the subject, not the GAN: the generator pre-trains (a quarter of the graph to trace).
    argv = ["-data_path", str(data), "-checkpoint_dir", str(ckpt), "-epochs", "1", "-train_fraction", "0.67",
            "-bids_filter", "desc-brain", "-path_prediction", str(base / "pred"), "-pretrain_steps", "100"] + TINY
    assert model.main(argv) == 0
    return {"base": base, "data": data, "ckpt": ckpt}


def _evaluate(ckpt, out, *extra):
    return model.main(["-evaluate", "True", "-checkpoint_dir_restore", str(ckpt), "-path_volumes", str(out),
                       *map(str, extra)])


def _metrics(path):
    fieldnames, rows = durable.read_csv_rows(str(path))
    return fieldnames, rows


# ----------------------------------------------------------------------------
# BIDS end to end: train, evaluate, derivatives
# ----------------------------------------------------------------------------

def test_bids_training_records_subject_sessions_and_the_filter(bids_run):
    split = json.loads((bids_run["ckpt"] / "split.json").read_text())
    assert split["train"] == ["sub-01_ses-1", "sub-01_ses-2"] and split["test"] == ["sub-02"]
    assert json.loads((bids_run["ckpt"] / "config.json").read_text())["bids_filter"] == "desc-brain"


def test_bids_evaluation_writes_valid_derivatives(bids_run, tmp_path, capsys):
    out = tmp_path / "derivatives"
    # No -bids_filter: the training's desc-brain comes from config.json (sub-02 has two T1w files).
    assert _evaluate(bids_run["ckpt"], out) == 0
    assert "data: BIDS dataset" in capsys.readouterr().out.splitlines()[0]
    anat = out / "sub-02" / "anat"
    names = sorted(os.listdir(anat))
    assert names == sorted(f"sub-02_{stem}_T1w.{ext}" for stem in ("rec-SRx2_desc-brain", "rec-LRx2_desc-brain",
                                                                   "desc-reference") for ext in ("nii.gz", "json"))
    assert (out / "sub-02" / "figures" / "sub-02_rec-SRx2_desc-brain_slices.png").stat().st_size > 100
    source = nib.load(str(bids_run["data"] / "sub-02/anat/sub-02_desc-brain_T1w.nii.gz"))
    sr = nib.load(str(anat / "sub-02_rec-SRx2_desc-brain_T1w.nii.gz"))
    assert sr.shape == source.shape
    np.testing.assert_allclose(sr.affine, source.affine, atol=1e-5)

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    (generated,) = description["GeneratedBy"]
    assert generated["Name"] == version.PROGRAM_NAME and generated["Version"] == version.__version__
    checkpoint = os.path.realpath(tf.train.latest_checkpoint(str(bids_run["ckpt"])))
    assert checkpoint in generated["Description"]
    # Portable links: a path relative to the derivatives folder, the source named by a BIDS URI.
    relative = os.path.relpath(bids_run["data"].resolve(), out.resolve())
    assert description["DatasetLinks"] == {"raw": pathlib.Path(relative).as_posix()}
    assert description["SourceDatasets"] == [{"URL": "bids:raw:"}]
    assert (out / description["DatasetLinks"]["raw"]).resolve() == bids_run["data"].resolve()

    sidecar = json.loads((anat / "sub-02_rec-SRx2_desc-brain_T1w.json").read_text())
    assert sidecar["UpsamplingFactor"] == 2 and sidecar["UpsamplingMode"] == "subpixel"
    assert sidecar["CheckpointStep"] == 8 and sidecar["Checkpoint"] == checkpoint  # 2 volumes x 8 patches / 2
    assert sidecar["Blend"] == "crop" and sidecar["TTA"] == "none"
    assert sidecar["Sources"] == ["bids:raw:sub-02/anat/sub-02_desc-brain_T1w.nii.gz"]
    _, rows = _metrics(out / "metrics.csv")
    assert [r["subject"] for r in rows] == ["sub-02"]
    assert sidecar["Metrics"]["psnr"] == pytest.approx(float(rows[0]["psnr"]), abs=1e-5)
    assert np.isfinite(sidecar["Metrics"]["ssim_tricubic_fair"])
    lr_sidecar = json.loads((anat / "sub-02_rec-LRx2_desc-brain_T1w.json").read_text())
    assert lr_sidecar["UpsamplingFactor"] == 2 and lr_sidecar["Sigma"] == 1.0
    # sub-02's image is zero outside its desc-brain mask: skull-stripped, and so are its outputs.
    for stem in ("rec-SRx2_desc-brain", "rec-LRx2_desc-brain", "desc-reference"):
        assert json.loads((anat / f"sub-02_{stem}_T1w.json").read_text())["SkullStripped"] is True
    assert (out / ".bidsignore").read_text().splitlines() == ["metrics.csv", "metrics.json", "report.html",
                                                              "**/figures"]
    assert "SkullStripped" in (out / "README.md").read_text()


def test_super_resolve_a_bids_file_and_a_bids_dataset(bids_run, tmp_path):
    out = tmp_path / "sr"
    raw = bids_run["data"] / "sub-02/anat/sub-02_T1w.nii.gz"
    argv = ["-super_resolve", str(raw), "-checkpoint_dir_restore", str(bids_run["ckpt"]), "-path_volumes", str(out)]
    assert model.main(argv) == 0
    written = out / "sub-02/anat/sub-02_rec-SRx2_T1w.nii.gz"
    assert nib.load(str(written)).shape == tuple(2 * n for n in SHAPE)
    sidecar = json.loads((out / "sub-02/anat/sub-02_rec-SRx2_T1w.json").read_text())
    assert sidecar["Sources"] == ["bids:raw:sub-02/anat/sub-02_T1w.nii.gz"] and "Metrics" not in sidecar
    # The whole dataset (its config's desc-brain filter) into the same derivatives folder.
    argv[1] = str(bids_run["data"])
    assert model.main(argv) == 0
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*_T1w.nii.gz"))
    assert found == ["sub-01/ses-1/anat/sub-01_ses-1_rec-SRx2_desc-brain_T1w.nii.gz",
                     "sub-01/ses-2/anat/sub-01_ses-2_rec-SRx2_desc-brain_T1w.nii.gz",
                     "sub-02/anat/sub-02_rec-SRx2_T1w.nii.gz",
                     "sub-02/anat/sub-02_rec-SRx2_desc-brain_T1w.nii.gz"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert len(description["SourceDatasets"]) == 1 and list(description["DatasetLinks"]) == ["raw"]


def test_derivatives_of_another_checkpoint_are_not_mixed(tmp_path):
    outputs = BidsOutputs(str(tmp_path), 2)
    mine = [{"Name": version.PROGRAM_NAME, "Version": version.__version__, "Description": "checkpoint A"}]
    outputs.start(mine, [])
    outputs.start(mine, [])  # the same run again: fine
    with pytest.raises(errors.UserError, match="describes another dataset"):
        BidsOutputs(str(tmp_path), 2).start([dict(mine[0], Description="checkpoint B")], [])


def _validator_errors(folder):
    """The errors bids-validator-deno reports on a folder (its --format json output)."""
    found = subprocess.run([VALIDATOR, "--format", "json", str(folder)], capture_output=True, text=True,
                           timeout=300, check=False)
    report = json.loads(found.stdout)
    return [(i["code"], i.get("location")) for i in report["issues"]["issues"] if i["severity"] == "error"]


VALIDATOR = shutil.which("bids-validator-deno") or shutil.which(
    "bids-validator-deno", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(VALIDATOR is None, reason="bids-validator-deno is not installed "
                                              "(pip install bids-validator-deno, requirements-test.txt)")
def test_derivatives_pass_the_bids_validator(bids_run, tmp_path):
    # A copy of the dataset is not the training data: every subject-session is evaluated.
    raw = tmp_path / "raw"
    shutil.copytree(bids_run["data"], raw)
    out = raw / "derivatives" / "srgan"
    assert _evaluate(bids_run["ckpt"], out, "-data_path", raw, "-blend", "gaussian", "-tta", "flip",
                     "-output_layout", "bids") == 0
    assert len(list(out.rglob("*_rec-SRx2_desc-brain_T1w.nii.gz"))) == 3
    assert (out / "sub-01" / "ses-1" / "figures").is_dir()
    # The report and its figures are in the folder the validator reads (and ignores by .bidsignore).
    assert (out / "report.html").is_file()
    assert len(list(out.rglob("figures/*_rec-SRx2_desc-brain_report.png"))) == 3
    sr = tmp_path / "sr"
    assert model.main(["-super_resolve", str(raw), "-checkpoint_dir_restore", str(bids_run["ckpt"]),
                       "-path_volumes", str(sr), "-output_layout", "bids"]) == 0
    assert (sr / "report.html").is_file()
    assert _validator_errors(out) == []
    assert _validator_errors(sr) == []
    assert json.loads((out / "dataset_description.json").read_text())["DatasetLinks"] == {"raw": "../.."}
    try:
        import bids
    except ImportError:
        return
    layout = bids.BIDSLayout(str(out), validate=False, is_derivative=True)
    found = layout.get(reconstruction="SRx2", suffix="T1w", extension=".nii.gz")
    assert sorted((f.entities["subject"], f.entities.get("session")) for f in found) == [
        ("01", "1"), ("01", "2"), ("02", None)]


def test_an_earlier_derivatives_folder_gets_portable_links(tmp_path):
    root = tmp_path / "raw"
    image = _save(root / "sub-01/anat/sub-01_T1w.nii.gz", np.ones((4, 4, 4)), np.eye(4))
    out = root / "derivatives" / "sr"
    out.mkdir(parents=True)
    mine = [{"Name": version.PROGRAM_NAME, "Version": version.__version__, "Description": "checkpoint A"}]
    uri = root.resolve().as_uri()
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "x", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": mine,
        "DatasetLinks": {"raw": uri}, "SourceDatasets": [{"URL": uri}, {"DOI": "doi:10.1/x"}]}))
    (out / ".bidsignore").write_text("metrics.csv\n**/figures/\n")
    scan = scans.bids_file_scan(image)
    outputs = BidsOutputs(str(out), 2)
    outputs.start(mine, [scan])
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetLinks"] == {"raw": "../.."}  # the same link, made relative: no raw2
    assert description["SourceDatasets"] == [{"URL": "bids:raw:"}, {"DOI": "doi:10.1/x"}]
    assert outputs.source(scan) == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"
    assert (out / ".bidsignore").read_text().splitlines() == ["metrics.csv", "**/figures/", "metrics.json",
                                                              "report.html", "**/figures"]
    assert outputs.link_target(uri) == str(root.resolve())
    assert outputs.link_target("https://example.org/ds") is None


def test_a_source_without_a_relative_path_keeps_a_file_uri(tmp_path, monkeypatch):
    def other_drive(path, start=None):
        raise ValueError(f"path is on mount 'D:', start on mount 'C:' ({path}, {start})")

    monkeypatch.setattr(os.path, "relpath", other_drive)
    outputs = BidsOutputs(str(tmp_path / "out"), 2)
    assert outputs.portable_link(str(tmp_path / "raw")) == (tmp_path / "raw").resolve().as_uri()


def test_skull_stripped_is_the_sources(tmp_path):
    image, mask, affine = _phantoms(1, seed=11)[0]  # zero outside its mask
    root = tmp_path / "bids"
    (root / "sub-01/anat").mkdir(parents=True)
    (root / "T1w.json").write_text('{"SkullStripped": false}')
    for sub in ("sub-01", "sub-02"):
        _save(root / f"{sub}/anat/{sub}_T1w.nii.gz", image, affine)
        _save(root / f"{sub}/anat/{sub}_desc-brain_mask.nii.gz", mask, affine, dtype=np.uint8)
    (root / "sub-01/anat/sub-01_T1w.json").write_text('{"SkullStripped": true}')
    bids_scans = {s.name: scans.InputScan(s, str(root), True) for s in layouts.find_subjects(str(root), log=Log())[0]}
    assert scans.skull_stripped(bids_scans["sub-01"]) is True  # its own sidecar wins over the root's
    assert scans.skull_stripped(bids_scans["sub-02"]) is False  # inherited from the root's T1w.json
    adni = _save(tmp_path / "adni/s1" / layouts.IMAGE_NAME, image + 1, affine)
    assert scans.skull_stripped(scans.InputScan(layouts.Subject("s1", adni))) is True
    plain = _save(tmp_path / "flat/a.nii.gz", image, affine)
    mask_path = _save(tmp_path / "flat/a_mask.nii.gz", mask, affine, dtype=np.uint8)
    assert scans.skull_stripped(scans.InputScan(layouts.Subject("a", plain, mask_path))) is True
    assert scans.skull_stripped(scans.InputScan(layouts.Subject("a", plain))) is False  # no mask file
    head = _save(tmp_path / "flat/b.nii.gz", image + 1, affine)  # non-zero outside the mask
    assert scans.skull_stripped(scans.InputScan(layouts.Subject("b", head, mask_path))) is False


@pytest.mark.parametrize("entities, changes, stem", [
    ((("sub", "01"),), {"rec": "SRx2"}, "sub-01_rec-SRx2"),
    ((("sub", "01"), ("ses", "M00")), {"desc": "reference"}, "sub-01_ses-M00_desc-reference"),
    ((("sub", "01"), ("desc", "brain"), ("acq", "mp"), ("run", "2")), {"rec": "LRx4"},
     "sub-01_acq-mp_rec-LRx4_run-2_desc-brain"),
    ((("sub", "01"), ("rec", "norm"), ("foo", "x"), ("space", "MNI")), {"rec": "SRx2"},
     "sub-01_rec-SRx2_space-MNI_foo-x"),
    ((("sub", "01"), ("desc", "brain")), {"desc": "reference"}, "sub-01_desc-reference"),
])
def test_bids_names_follow_the_entity_order(entities, changes, stem):
    assert bids_stem(entities, **changes) == stem


# ----------------------------------------------------------------------------
# CSV lists
# ----------------------------------------------------------------------------

def _csv_dataset(base):
    phantoms = _phantoms(3, seed=5)
    lines = ["image,mask,subject,split"]
    for i, (image, mask, affine) in enumerate(phantoms):
        _save(base / "images" / f"scan{i}.nii.gz", image, affine)
        _save(base / "masks" / f"scan{i}_mask.nii.gz", mask, affine, dtype=np.uint8)
        lines.append(f"../images/scan{i}.nii.gz,../masks/scan{i}_mask.nii.gz,002_S_{i:04d},"
                     + ("test" if i == 0 else "train"))
    os.makedirs(base / "lists")
    (base / "lists" / "adni.csv").write_text("\n".join(lines) + "\n")
    return base / "lists" / "adni.csv"


def test_csv_list_with_relative_paths_and_a_split_column_is_honoured(bids_run, tmp_path):
    listing = _csv_dataset(tmp_path)
    argv = ["-data_path", str(listing), "-checkpoint_dir", str(tmp_path / "ckpt")] + TINY
    cfg = model.parse_command(argv, log=lambda *_: None).settings
    split = splits.training_split(cfg, Log())
    assert [s.name for s in split.train] == ["002_S_0001", "002_S_0002"]
    assert [s.name for s in split.test] == ["002_S_0000"] and split.validation == []
    # Evaluated with another run's checkpoint: the list's own test rows, plain names by its subject column.
    log = Log()
    command = model.parse_command(
        ["-evaluate", "True", "-checkpoint_dir_restore", str(bids_run["ckpt"]), "-data_path", str(listing),
         "-path_volumes", str(tmp_path / "plain")], log=log)
    rows = evaluation.evaluate(command.settings, command.source_checkpoint, log=log)
    assert [r["subject"] for r in rows] == ["002_S_0000"] and "split column" in log.text
    assert (tmp_path / "plain" / "002_S_0000_sr.nii.gz").exists()
    # -output_layout bids names a non-BIDS subject sub-<its name without separators>.
    assert _evaluate(bids_run["ckpt"], tmp_path / "bids", "-data_path", listing, "-output_layout", "bids") == 0
    assert (tmp_path / "bids/sub-002S0000/anat/sub-002S0000_rec-SRx2_T1w.nii.gz").exists()
    sidecar = json.loads((tmp_path / "bids/sub-002S0000/anat/sub-002S0000_rec-SRx2_T1w.json").read_text())
    assert sidecar["Sources"] == [(tmp_path / "images" / "scan0.nii.gz").resolve().as_uri()]


# ----------------------------------------------------------------------------
# Clear refusals before any work
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("extra, fragment", [
    (["-bids_filter", "desc_brain"], "is not a BIDS entity"),
    (["-bids_filter", "desc-brain"], "applies to BIDS datasets"),  # the data are ADNI folders
    (["-path_volumes", "{data}/volumes"], "inside the data"),
    (["-path_volumes", "{data}/demo_000/{image}/x"], "is a file, not a folder"),
])
def test_bad_layout_or_output_folder_is_a_clear_error(bids_run, tmp_path, capsys, extra, fragment):
    data = tmp_path / "data"
    phantoms.make_demo_data(str(data), subjects=2, shape=SHAPE, seed=6)
    extra = [e.format(data=data, image=layouts.IMAGE_NAME) for e in extra]
    argv = ["-evaluate", "True", "-checkpoint_dir_restore", str(bids_run["ckpt"]), "-data_path", str(data),
            "-path_volumes", str(tmp_path / "out")] + extra
    assert model.main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and err.count("\n") == 1
    assert not (data / "volumes").exists()


def test_outputs_inside_a_bids_dataset_belong_in_derivatives(tmp_path):
    bids = tmp_path / "bids"
    (bids / "sub-01").mkdir(parents=True)
    folders.check_output_folder(str(bids / "derivatives" / "sr"), [(str(bids), "bids")])
    folders.check_output_folder(str(bids / "sub"), [(str(bids / "list.csv"), "csv")])
    for inside in (bids, bids / "sub-01" / "sr"):
        with pytest.raises(errors.UserError, match="derivatives"):
            folders.check_output_folder(str(inside), [(str(bids), "bids")])


def test_a_second_evaluation_into_the_same_folder_is_refused(bids_run, tmp_path, capsys):
    out = tmp_path / "out"
    with durable.RunLock(str(out), "evaluation"):
        assert _evaluate(bids_run["ckpt"], out) == 2
    assert "locked" in capsys.readouterr().err
    assert not (out / "metrics.csv").exists()


def test_a_generator_mismatch_logs_no_tensorflow_warnings(bids_run):
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    tf_logger = tf.get_logger()
    level = tf_logger.level
    tf_logger.addHandler(handler)
    tf_logger.setLevel(logging.WARNING)
    path = tf.train.latest_checkpoint(str(bids_run["ckpt"]))
    try:
        # The old way, a failed restore on the model itself, logs a line per unrestored value.
        g = networks.build_generator(2, residual_blocks=0, feature_size=4)
        with pytest.raises(ValueError):
            tf.train.Checkpoint(generator=g).restore(path)
        del g
        gc.collect()
        assert len(records) > 20
        records.clear()
        g = networks.build_generator(2, residual_blocks=0, feature_size=4)
        with pytest.raises(errors.UserError, match="does not fit the architecture flags"):
            checkpoints.restore_generator(g, str(bids_run["ckpt"]))
        del g
        gc.collect()
        assert records == []
        # A fitting generator still restores (the throwaway copy is only a probe).
        g = networks.build_generator(2, residual_blocks=1, feature_size=4)
        checkpoints.restore_generator(g, str(bids_run["ckpt"]))
        reader = tf.train.load_checkpoint(path)
        kernel = [w for w in g.weights if w.path.endswith("kernel")][0].numpy()
        # Trainable weights are stored once, under the path the object graph
        # reaches first (the optimiser's), so look for the kernel by shape everywhere.
        saved = [reader.get_tensor(k) for k, shape in tf.train.list_variables(path)
                 if tuple(shape) == kernel.shape]
        assert any(np.array_equal(kernel, s) for s in saved)
        assert records == []
    finally:
        tf_logger.removeHandler(handler)
        tf_logger.setLevel(level)


# ----------------------------------------------------------------------------
# -blend and -tta
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("blend, tta, labels", [
    ("crop", "none", ["crop"]),
    ("gaussian", "none", ["crop", "gaussian"]),
    ("crop", "flip", ["crop", "crop+flip"]),
    ("gaussian", "flip", ["crop", "gaussian", "gaussian+flip"]),
])
def test_each_option_adds_one_variant_and_its_columns(blend, tta, labels):
    variants = inference.inference_variants(blend, tta)
    assert [v.label for v in variants] == labels
    columns = metrics.metric_columns(variants)
    assert columns[:len(metrics.METRIC_COLUMNS)] == metrics.METRIC_COLUMNS
    assert len(columns) == len(metrics.METRIC_COLUMNS) + 6 * (len(labels) - 1)  # PSNR, SSIM, bias; rule and fair
    assert len(set(columns)) == len(columns)


@pytest.mark.parametrize("blend, tta", [("mean", "none"), ("crop", "rot90")])
def test_unknown_options_are_refused(blend, tta):
    with pytest.raises(ValueError):
        inference.inference_variants(blend, tta)


def _ramp_exact_predictor(axis, f):
    """An ideal network for the x[::f] degradation of volumes that are linear along ``axis``.

    An LR voxel is the first of its f HR voxels (``x[::f]``): each block is
    filled by linear interpolation towards the next LR voxel (the last block
    extrapolates with the previous slope); the other axes repeat.
    """
    def predict(x):
        x = np.asarray(x, np.float64)[..., 0]  # (n, a, b, c)
        a = axis + 1
        nxt = np.concatenate([np.take(x, np.arange(1, x.shape[a]), a),
                              2 * np.take(x, [-1], a) - np.take(x, [-2], a)], a)
        parts = [x + (nxt - x) * r / f for r in range(f)]
        up = np.stack(parts, a + 1).reshape(x.shape[:a] + (x.shape[a] * f,) + x.shape[a + 1:])
        for other in {1, 2, 3} - {a}:
            up = np.repeat(up, f, other)
        return up[..., None].astype(np.float32)
    return predict


@pytest.mark.parametrize("f", [2, 4])
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("blend", ["crop", "gaussian"])
def test_flip_tta_keeps_an_exact_reconstruction_exact(f, axis, blend):
    # HR linear along `axis`, degraded as training degrades (x[::f]): the ideal
    # network recovers it; mirrored, an LR voxel stands for the *last* voxel of
    # its block, so the mirrored pass comes back f - 1 voxels off, and TTA must
    # put it back on the grid rather than average two misaligned volumes.
    shape = [24, 24, 24]
    hr = np.broadcast_to(np.arange(shape[axis], dtype=np.float32).reshape(
        [-1 if i == axis else 1 for i in range(3)]), shape).copy()
    lr = hr[::f, ::f, ::f]
    predict = _ramp_exact_predictor(axis, f)
    patch, margin = (8 * f, 8 * f, 8 * f), f
    plain = inference.super_resolve_volume(predict, lr, f, patch, margin, blend=blend)
    np.testing.assert_allclose(plain, hr, atol=1e-4)
    tta = inference.super_resolve_volume(predict, lr, f, patch, margin, blend=blend, flip_axis=axis)
    np.testing.assert_allclose(tta, hr, atol=1e-4)
    # Not vacuous: the mirrored pass alone, mirrored back, is f - 1 voxels off.
    mirrored = np.flip(inference.super_resolve_volume(predict, np.flip(lr, axis).copy(), f, patch, margin,
                                                  blend=blend), axis)
    np.testing.assert_allclose(mirrored, hr - (f - 1), atol=1e-4)


def test_flip_tta_averages_the_mirrored_pass_mirrored_back():
    calls = []

    def ramp_predict(x):
        # Nearest upsampling plus a ramp along axis 1 of each patch: not flip-equivariant.
        x = np.asarray(x)
        calls.append(x.shape[0])
        up = np.repeat(np.repeat(np.repeat(x, 2, 1), 2, 2), 2, 3)
        return up + np.arange(up.shape[2], dtype=np.float32)[None, None, :, None, None]

    lr = np.random.default_rng(0).normal(size=(7, 6, 5)).astype(np.float32)
    up = np.repeat(np.repeat(np.repeat(lr, 2, 0), 2, 1), 2, 2)
    tta = inference.super_resolve_volume(ramp_predict, lr, 2, (16, 16, 12), 2, flip_axis=1)
    # Plain: up + ramp 0..11; mirrored back: up + 11..0, put one voxel back
    # along the axis (x[::2] sampling), the last slice keeping the plain value.
    ramp = np.arange(12, dtype=np.float32)[None, :, None]
    plain, mirrored = up + ramp, up + ramp[:, ::-1]
    aligned = plain.copy()
    aligned[:, :11] = mirrored[:, 1:]
    np.testing.assert_allclose(tta, (plain + aligned) / 2, atol=1e-5)
    # Several variants share the network passes: one plain, one mirrored.
    calls.clear()
    lr = np.random.default_rng(1).normal(size=(13, 11, 9)).astype(np.float32)
    variants = inference.inference_variants("gaussian", "flip")
    out = inference.super_resolve_variants(ramp_predict, lr, 2, (8, 8, 6), 2, 4, variants, flip_axis=0)
    assert sum(calls) == 2 * td.patches_per_volume((13, 11, 9), (4, 4, 3), 1)
    for v in variants:
        alone = inference.super_resolve_volume(ramp_predict, lr, 2, (8, 8, 6), 2, 4, blend=v.blend,
                                           flip_axis=0 if v.flip else None)
        np.testing.assert_allclose(out[v], alone, atol=1e-6)


def _recording_predictor(seen):
    def predict(x):
        x = np.asarray(x)
        seen.append(x)
        return np.repeat(np.repeat(np.repeat(x, 2, 1), 2, 2), 2, 3)
    return predict


def _flipped_axis(seen, lr):
    """Which axis the second network pass mirrored (None: no second pass)."""
    batches = np.concatenate(seen)
    n = len(batches) // 2
    if len(batches) != 2 * n or n == 0:
        return None
    patch = batches.shape[1:4]
    margin = 1
    for axis in range(3):
        if np.array_equal(batches[n:], td.extract_patches(np.flip(lr, axis), patch, margin)):
            return axis
    return "unknown"


# Voxel axes -> world: which voxel axis runs left-right (world x).
OBLIQUE = np.array([[0.0, 0.0, -2.0, 30.0], [2.0, 0.0, 0.0, -20.0], [0.0, 2.0, 0.0, 5.0], [0, 0, 0, 1]])
_c, _s = np.cos(0.5), np.sin(0.5)  # a 29-degree rotation about world z: voxel axis 2 still closest to x
ROTATED = np.array([[_s, 0, 2 * _c, 0], [_c, 0, -2 * _s, 0], [0, 2.0, 0, 0], [0, 0, 0, 1.0]])


@pytest.mark.parametrize("affine, lr_axis", [
    (np.diag([2.0, 2.0, 2.0, 1.0]), 0),
    (np.diag([-2.0, 2.0, 2.0, 1.0]), 0),  # radiological (LAS) storage
    (OBLIQUE, 2),
    (ROTATED, 2),
    (np.array([[0, -2.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]]), 1),
])
def test_flip_tta_mirrors_the_left_right_axis_of_the_affine(bids_run, tmp_path, monkeypatch, affine, lr_axis):
    scan = np.random.default_rng(0).uniform(1, 300, (9, 8, 7)).astype(np.float32)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(scan, affine), str(path))
    seen = []
    monkeypatch.setattr(inference, "restored_predictor", lambda cfg, checkpoint_dir, log: (
        _recording_predictor(seen), checkpoints.checkpoint_identity(checkpoint_dir)))
    command = model.parse_command(
        ["-super_resolve", str(path), "-checkpoint_dir_restore", str(bids_run["ckpt"]),
         "-path_volumes", str(tmp_path / "out"), "-tta", "flip"], log=lambda *_: None)
    # Smaller than the checkpoint's patch (a flag would contradict it): a multi-patch pass.
    cfg = command.settings.replace(patch_shape=(8, 8, 6), patch_margin=2)
    (out,) = super_resolve.super_resolve_file(cfg, command.source_checkpoint, log=lambda *_: None)
    lr_n, _ = utils.normalize(scan)
    assert _flipped_axis(seen, lr_n) == lr_axis
    assert json.loads((tmp_path / "out" / "scan_sr.json").read_text())["TTA"] == "flip"
    # The recording predictor is nearest upsampling: the plain pass is that, and
    # the mirrored pass the same, put one voxel back along the left-right axis.
    plain = np.repeat(np.repeat(np.repeat(scan, 2, 0), 2, 1), 2, 2)
    aligned = plain.copy()
    head = [slice(None)] * 3
    head[lr_axis] = slice(0, plain.shape[lr_axis] - 1)
    tail = [slice(None)] * 3
    tail[lr_axis] = slice(1, None)
    aligned[tuple(head)] = plain[tuple(tail)]
    np.testing.assert_allclose(nib.load(out).get_fdata(), (plain + aligned) / 2, rtol=1e-5)


def test_evaluation_mirrors_the_sources_left_right_axis(bids_run, tmp_path, monkeypatch):
    image, mask, _ = _phantoms(1, seed=7)[0]
    affine = np.array([[0, 0, -1.0, 10], [1.0, 0, 0, -5], [0, 1.0, 0, 3], [0, 0, 0, 1]])  # left-right: axis 2
    data = tmp_path / "data"
    _save(data / "s1" / layouts.IMAGE_NAME, image, affine)
    seen = []
    monkeypatch.setattr(inference, "restored_predictor", lambda cfg, checkpoint_dir, log: (
        _recording_predictor(seen), checkpoints.checkpoint_identity(checkpoint_dir)))
    assert _evaluate(bids_run["ckpt"], tmp_path / "out", "-data_path", data, "-tta", "flip") == 0
    hr, _ = td.to_canonical(image.astype(np.float32), (32, 32, 24))
    lr_n = np.asarray(degradation.degrade(utils.normalize(hr)[0], 2, 1.0))
    batches = np.concatenate(seen)
    n = len(batches) // 2
    assert np.array_equal(batches[n:], td.extract_patches(np.flip(lr_n, 2), (10, 10, 8), 1))
    fieldnames, rows = _metrics(tmp_path / "out" / "metrics.csv")
    assert "psnr_sr_crop" in fieldnames and len(rows) == 1


def test_options_are_reported_side_by_side_and_in_the_header(bids_run, tmp_path):
    log = Log()
    command = model.parse_command(
        ["-evaluate", "True", "-checkpoint_dir_restore", str(bids_run["ckpt"]), "-path_volumes", str(tmp_path),
         "-blend", "gaussian", "-tta", "flip", "-output_layout", "plain"], log=log)
    rows = evaluation.evaluate(command.settings, command.source_checkpoint, log=log)
    for label in ("crop", "gaussian", "gaussian+flip"):
        assert any(line.strip().startswith(f"SR {label} ") for line in log.lines), label
    header = metrics.read_settings(str(tmp_path / "metrics.csv"))
    assert header["blend"] == "gaussian" and header["tta"] == "flip" and header["sr"] == "gaussian+flip"
    assert header == json.loads((tmp_path / "metrics.json").read_text())
    # metrics.csv itself is plain: a header row and one row per subject, for every tool's defaults.
    with open(tmp_path / "metrics.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert tuple(table[0]) == metrics.metric_columns(inference.inference_variants("gaussian", "flip"))
    assert [r[0] for r in table[1:]] == ["sub-02"]
    pandas = pytest.importorskip("pandas")
    frame = pandas.read_csv(tmp_path / "metrics.csv")
    assert list(frame.columns) == table[0] and list(frame["subject"]) == ["sub-02"]
    assert frame["psnr"][0] == pytest.approx(rows[0]["psnr"], abs=1e-5)
    # The written _sr volume is the fully-optioned one; the others are columns.
    assert {"psnr_sr_crop", "psnr_sr_gaussian", "ssim_sr_gaussian_fair"} <= set(rows[0])
    assert len({rows[0]["psnr"], rows[0]["psnr_sr_crop"], rows[0]["psnr_sr_gaussian"]}) == 3
    sidecar = json.loads((tmp_path / "sub-02_sr.json").read_text())
    assert sidecar["Blend"] == "gaussian" and sidecar["TTA"] == "flip"
    assert sidecar["Metrics"]["psnr"] == pytest.approx(rows[0]["psnr"], abs=1e-5)


def test_mosaic_has_a_column_per_variant():
    vol = np.random.default_rng(0).uniform(0, 1, (8, 8, 6)).astype(np.float32)
    row = {"psnr": 30.0, "ssim": 0.9, "psnr_fair": 29.0, "ssim_fair": 0.88, "psnr_tricubic_fair": 28.0,
           "ssim_tricubic_fair": 0.87}
    subject = layouts.Subject("s", "s.nii.gz")
    one = evaluation.mosaic(subject, row, vol, vol, {inference.Variant(): vol}, vol)
    three = evaluation.mosaic(subject, row, vol, vol, {v: vol for v in inference.inference_variants("gaussian", "flip")}, vol)
    assert three.shape[0] == one.shape[0] and three.shape[1] > one.shape[1] * 1.3
    no_mask = evaluation.mosaic(subject, {"psnr": float("nan"), "ssim": float("nan")}, vol, vol,
                            {inference.Variant(): vol}, vol)
    assert no_mask.shape[0] == one.shape[0]


# ----------------------------------------------------------------------------
# Resumable evaluation, honest metrics
# ----------------------------------------------------------------------------

def _adni_data(folder, n, seed):
    phantoms.make_demo_data(str(folder), subjects=n, shape=SHAPE, seed=seed)
    return folder


def test_an_evaluation_killed_half_way_resumes_each_subject_once(bids_run, tmp_path, monkeypatch, capsys):
    data = _adni_data(tmp_path / "data", 3, seed=8)
    out = tmp_path / "out"
    original = evaluation.evaluate_subject
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_subject", interrupted)
    assert _evaluate(bids_run["ckpt"], out, "-data_path", data) == 130
    _, rows = _metrics(out / "metrics.csv")
    assert [r["subject"] for r in rows] == ["demo_000"]
    monkeypatch.setattr(evaluation, "evaluate_subject", original)
    capsys.readouterr()
    assert _evaluate(bids_run["ckpt"], out, "-data_path", data) == 0
    assert "resuming: 1 of 3 subject(s)" in capsys.readouterr().out
    _, rows = _metrics(out / "metrics.csv")
    assert sorted(r["subject"] for r in rows) == ["demo_000", "demo_001", "demo_002"]
    # Other settings into the same folder: refused, the file untouched.
    before = (out / "metrics.csv").read_bytes()
    assert _evaluate(bids_run["ckpt"], out, "-data_path", data, "-blend", "gaussian") == 2
    err = capsys.readouterr().err
    assert "another evaluation" in err and "blend: crop here, gaussian now" in err
    assert (out / "metrics.csv").read_bytes() == before


def test_an_evaluation_killed_by_sigkill_resumes_each_subject_once(bids_run, tmp_path, capsys):
    data = _adni_data(tmp_path / "data", 10, seed=9)
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "model.py"), "-evaluate", "True", "-checkpoint_dir_restore",
           str(bids_run["ckpt"]), "-data_path", str(data), "-path_volumes", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if len(_metrics(out / "metrics.csv")[1]) >= 1:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL, "the evaluation ended before it could be killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    first = len(_metrics(out / "metrics.csv")[1])
    assert 1 <= first < 10
    assert _evaluate(bids_run["ckpt"], out, "-data_path", data) == 0
    assert f"resuming: {first} of 10" in capsys.readouterr().out
    _, rows = _metrics(out / "metrics.csv")
    assert sorted(r["subject"] for r in rows) == [f"demo_{i:03d}" for i in range(10)]


def test_an_empty_mask_is_nan_and_a_negative_image_is_skipped(bids_run, tmp_path, capsys):
    (good, mask, affine), (image2, _, affine2), (image3, mask3, affine3) = _phantoms(3, seed=10)
    data = tmp_path / "data"
    _save(data / "a_good" / layouts.IMAGE_NAME, good, affine)
    _save(data / "a_good" / layouts.MASK_NAME, mask, affine, dtype=np.uint8)
    _save(data / "b_empty_mask" / layouts.IMAGE_NAME, image2, affine2)
    _save(data / "b_empty_mask" / layouts.MASK_NAME, np.zeros(SHAPE), affine2, dtype=np.uint8)
    negative = _save(data / "c_negative" / layouts.IMAGE_NAME, -image3.astype(np.int16) - 1, affine3)
    out = tmp_path / "out"
    assert _evaluate(bids_run["ckpt"], out, "-data_path", data) == 0
    captured = capsys.readouterr()
    assert f"{negative}: maximum intensity -1 <= 0" in captured.out
    _, rows = _metrics(out / "metrics.csv")
    by_name = {r["subject"]: r for r in rows}
    assert sorted(by_name) == ["a_good", "b_empty_mask"]
    assert np.isfinite(float(by_name["a_good"]["psnr"]))
    assert by_name["b_empty_mask"]["psnr"] == "nan" and by_name["b_empty_mask"]["ssim_tricubic_fair"] == "nan"
    assert "b_empty_mask: its brain mask is empty" in captured.out
    assert "left out of the summary" in captured.out and "inf" not in captured.out
    # The summary is over a_good alone.
    psnr_line = [line for line in captured.out.splitlines() if line.startswith("PSNR: mean")][0]
    assert f"mean {float(by_name['a_good']['psnr']):.4f}" in psnr_line
    # A single negative scan given to -super_resolve is an error naming it and its maximum.
    argv = ["-super_resolve", negative, "-checkpoint_dir_restore", str(bids_run["ckpt"]),
            "-path_volumes", str(tmp_path / "sr")]
    assert model.main(argv) == 2
    assert f"{negative}: maximum intensity -1 <= 0" in capsys.readouterr().err
    assert not (tmp_path / "sr").exists()  # no empty output folder left behind


def test_super_resolve_takes_several_files_and_folders(bids_run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(rng.uniform(0, 300, (9, 8, 7)).astype(np.float32), np.eye(4)),
                 str(tmp_path / f"{name}.nii.gz"))
    folder = tmp_path / "more"
    folder.mkdir()
    nib.save(nib.Nifti1Image(rng.uniform(0, 300, (9, 8, 7)).astype(np.float32), np.eye(4)), str(folder / "c.nii"))
    nib.save(nib.Nifti1Image(-np.ones((9, 8, 7), np.float32), np.eye(4)), str(folder / "d.nii.gz"))
    (folder / "e.nii.gz").write_bytes(b"not a NIfTI file")  # left out when the folder is listed
    out = tmp_path / "out"
    argv = ["-super_resolve", str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz"), str(folder),
            "-checkpoint_dir_restore", str(bids_run["ckpt"]), "-path_volumes", str(out)]
    # Two inputs skipped, one of them when the folder was listed: the others are written, and the
    # summary and the exit code say so.
    assert model.main(argv) == errors.EXIT_PARTIAL
    captured = capsys.readouterr()
    assert "3 super-resolved scan(s) written" in captured.out
    assert "; 2 skipped (1 of them when their folder or list was read)" in captured.out
    assert "2 of 5 inputs were skipped" in captured.err and "e.nii.gz" in captured.err
    assert sorted(set(os.listdir(out)) - {durable.LOCK_NAME}) == ["a_sr.json", "a_sr.nii.gz", "b_sr.json",
                                                                  "b_sr.nii.gz", "c_sr.json", "c_sr.nii.gz",
                                                                  "report.html"]
    # The report: each written scan with its output and figure, the skipped one with its reason.
    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 3
    assert all(f'href="{name}_sr.nii.gz"' in page for name in "abc") and "maximum intensity -1" in page
    assert captured.out.splitlines()[-1] == f"report: {out / 'report.html'}"
    assert "skipping" in captured.out and "d.nii.gz: maximum intensity -1" in captured.out
    assert "super-resolve" in captured.err  # the progress bar
    # Two inputs with the same name would overwrite each other: refused before any work.
    (tmp_path / "other").mkdir()
    os.link(tmp_path / "a.nii.gz", tmp_path / "other" / "a.nii.gz")
    argv[1:3] = [str(tmp_path / "a.nii.gz"), str(tmp_path / "other" / "a.nii.gz")]
    assert model.main(argv) == 2
    assert "would both be written" in capsys.readouterr().err


def test_version_flag_prints_the_provenance_versions_and_exits(capsys):
    import keras

    assert model.main(["-version"]) == 0
    out = capsys.readouterr().out
    assert out == version.versions_line() + "\n"
    assert out.startswith(version.program() + " ") and tf.__version__ in out and keras.__version__ in out


def test_metrics_settings_live_in_metrics_json_and_an_earlier_file_is_converted(tmp_path):
    columns = ("subject", "psnr")
    settings = {"program": "srgan3d-tf2 0.9", "checkpoint_sha256": "abc", "blend": "crop"}
    path = str(tmp_path / "metrics.csv")
    new = metrics.MetricsFile(path, columns, settings)
    assert new.done() == set()
    new.append({"subject": "s1", "psnr": 30.0})
    assert pathlib.Path(path).read_text() == "subject,psnr\ns1,30.000000\n"
    assert json.loads((tmp_path / "metrics.json").read_text()) == settings
    assert metrics.MetricsFile(path, columns, dict(settings, program="srgan3d-tf2 1.0")).done() == {"s1"}
    # An earlier version's file (its settings as "# key: value" lines): read, resumed, converted.
    os.remove(path)
    os.remove(tmp_path / "metrics.json")
    durable.append_csv_row(path, columns, {"subject": "s1", "psnr": 30.0},
                           header_lines=[f"{k}: {v}" for k, v in settings.items()])
    other = metrics.MetricsFile(path, columns, dict(settings, blend="gaussian"))
    with pytest.raises(errors.UserError, match="another evaluation.*blend: crop here, gaussian now"):
        other.done()
    assert pathlib.Path(path).read_text().startswith("# program")  # refused: untouched
    assert metrics.MetricsFile(path, columns, settings).done() == {"s1"}
    assert pathlib.Path(path).read_text() == "subject,psnr\ns1,30.000000\n"
    assert json.loads((tmp_path / "metrics.json").read_text()) == settings
    # Rows whose settings are unknown cannot be resumed.
    os.remove(tmp_path / "metrics.json")
    with pytest.raises(errors.UserError, match="no metrics.json beside it"):
        metrics.MetricsFile(path, columns, settings).done()


def test_a_csv_list_of_an_adni_tree_trains_and_evaluates(tmp_path):
    data = _adni_data(tmp_path / "DATA", 3, seed=12)
    rows = [f"DATA/demo_{i:03d}/{layouts.IMAGE_NAME},DATA/demo_{i:03d}/{layouts.MASK_NAME}" for i in range(3)]
    listing = tmp_path / "list.csv"
    listing.write_text("image,mask\n" + "\n".join(rows) + "\n")
    ckpt = tmp_path / "ckpt"
    assert model.main(["-data_path", str(listing), "-checkpoint_dir", str(ckpt), "-epochs", "1",
                       "-train_fraction", "0.67", "-pretrain_steps", "100"] + TINY) == 0  # the layout, not the GAN
    split = json.loads((ckpt / "split.json").read_text())
    assert split["train"] == ["demo_000", "demo_001"] and split["test"] == ["demo_002"]
    log = Log()
    command = model.parse_command(["-evaluate", "True", "-checkpoint_dir_restore", str(ckpt),
                                   "-path_volumes", str(tmp_path / "out")], log=log)
    rows = evaluation.evaluate(command.settings, command.source_checkpoint, log=log)
    assert [r["subject"] for r in rows] == ["demo_002"] and data.is_dir()
    assert "subject IDs from the images' folders, e.g. demo_000" in log.lines[0]
    assert (tmp_path / "out" / "demo_002_sr.nii.gz").exists()


def test_a_refusal_replaces_nothing_and_says_nothing_of_replacing(bids_run, tmp_path, capsys):
    import shutil

    other = tmp_path / "other_ckpt"  # another checkpoint (its path is in the outputs' GeneratedBy)
    shutil.copytree(bids_run["ckpt"], other, ignore=shutil.ignore_patterns("logs", "predictions"))
    (scan,) = sorted(bids_run["data"].glob("sub-02/**/anat/*desc-brain_T1w.nii.gz"))
    out = tmp_path / "out"
    argv = ["-super_resolve", str(scan), "-path_volumes", str(out), "-checkpoint_dir_restore"]
    assert model.main(argv + [str(bids_run["ckpt"])]) == 0
    written = {p: p.read_bytes() for p in out.rglob("*.nii.gz")}
    capsys.readouterr()
    assert model.main(argv + [str(other)]) == 2
    captured = capsys.readouterr()
    assert "describes another dataset" in captured.err
    assert "replacing" not in captured.out  # nothing was replaced
    assert {p: p.read_bytes() for p in out.rglob("*.nii.gz")} == written
    assert model.main(argv + [str(bids_run["ckpt"])]) == 0  # the same checkpoint again: it does replace, and says so
    assert "note: replacing 1 existing file(s)" in capsys.readouterr().out
