"""A trained generator as one file (model_file.py, export.py): -export, -model, plain Keras loading."""

import json
import shutil
import zipfile

import keras
import nibabel as nib
import numpy as np
import pytest

import export
import model
import model_file
import run_records
import networks  # noqa: F401 (registers the custom layers, as a user's script would)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """The shared run's generator exported to a .keras file."""
    path = tmp_path_factory.mktemp("export") / "srgan_x2.keras"
    assert model.main(["-export", str(path), "-checkpoint_dir_restore", str(run["ckpt"])]) == 0
    return path


def test_export_writes_one_self_describing_file(run, exported, capsys):
    metadata = model_file.read_metadata(str(exported))
    saved = json.loads((run["ckpt"] / "config.json").read_text())
    for key in ("upsampling_factor", "upsampling_mode", "sigma", "patch_shape", "patch_margin",
                "volume_shape", "residual_blocks", "feature_size"):
        assert metadata["settings"][key] == saved[key], key
    assert metadata["checkpoint"]["step"] == 16 and len(metadata["checkpoint"]["sha256"]) == 64
    assert metadata["training"]["train_subjects"] == 4 and metadata["training"]["epochs"] == 1
    assert "x2 super-resolution" in metadata["model_card"] and "normalisation" in metadata
    assert "trained: 1 of 1 epochs (step 16), 4 training subjects" in metadata["model_card"]
    # The card is printed as well as stored.
    path = exported.parent / "again.keras"
    assert model.main(["-export", str(path), "-checkpoint_dir_restore", str(run["ckpt"])]) == 0
    assert metadata["model_card"].splitlines()[0] in capsys.readouterr().out


def test_plain_keras_loads_the_file_and_super_resolves_a_patch(exported):
    generator = keras.saving.load_model(str(exported), compile=False)
    lr = np.random.default_rng(0).uniform(-1, 1, (1, 10, 10, 8, 1)).astype(np.float32)
    sr = np.asarray(generator(lr, training=False))
    assert sr.shape == (1, 20, 20, 16, 1) and np.isfinite(sr).all()


@pytest.mark.parametrize("command", ["evaluate", "super_resolve"])
def test_the_file_gives_the_checkpoints_volumes(run, exported, tmp_path, command):
    split = json.loads((run["ckpt"] / "split.json").read_text())
    (name,) = split["test"]
    if command == "evaluate":
        # The training data: the checkpoint's split.json names the test subject;
        # the file's run evaluates the same subject with its data path.
        flags = ["-evaluate", "True", "-data_path", str(run["data"]), "-train_fraction", "0.8"]
    else:
        flags = ["-super_resolve", str(run["data"] / name / "T1_brain_extractedBrainExtractionBrain.nii.gz")]
    outputs = {}
    for source in ("-checkpoint_dir_restore", "-model"):
        folder = tmp_path / source.strip("-")
        path = run["ckpt"] if source == "-checkpoint_dir_restore" else exported
        assert model.main(flags + [source, str(path), "-path_volumes", str(folder)]) == 0
        (sr,) = [p for p in folder.iterdir() if p.name.endswith("_sr.nii.gz")]
        outputs[source] = nib.load(str(sr)).get_fdata()
        # The report of a model file's run shows its model card.
        card = model_file.read_metadata(str(exported))["model_card"].splitlines()[0]
        assert (card in (folder / "report.html").read_text()) is (source == "-model")
    np.testing.assert_array_equal(outputs["-model"], outputs["-checkpoint_dir_restore"])


def _rewritten(source, target, metadata=None, drop=False):
    """A copy of a model file with its metadata replaced (or removed)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            if item.filename != model_file.METADATA_NAME:
                new.writestr(item, old.read(item.filename))
        if not drop:
            new.writestr(model_file.METADATA_NAME, json.dumps(metadata))
    return target


def test_corrupt_truncated_foreign_or_newer_files_are_clear_errors(exported, tmp_path, capsys):
    data = exported.read_bytes()
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(data[: len(data) // 2])
    newer = dict(model_file.read_metadata(str(exported)), format=model_file.FORMAT + 1, version="9.0.0")
    cases = {truncated: "corrupt or truncated",
             _rewritten(exported, tmp_path / "foreign.keras", drop=True): "not a model written by -export",
             _rewritten(exported, tmp_path / "newer.keras", newer): "9.0.0 (model file format 2)",
             tmp_path / "missing.keras": "does not exist"}
    for path, fragment in cases.items():
        argv = ["-super_resolve", str(path), "-model", str(path), "-path_volumes", str(tmp_path / "out")]
        assert model.main(argv) == 2, path
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, fragment", [
    (["-export", "out.h5", "-checkpoint_dir_restore", "CKPT"], "must name a .keras file"),
    (["-export", "out.keras"], "-export needs -checkpoint_dir_restore"),
    (["-evaluate", "True", "-model", "m.keras", "-checkpoint_dir_restore", "CKPT"], "not both"),
    (["-model", "m.keras"], "-model is for -evaluate and -super_resolve"),
    (["-export", "out.keras", "-evaluate", "True", "-checkpoint_dir_restore", "CKPT"], "two different commands"),
])
def test_export_and_model_flag_mistakes(run, argv, fragment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    argv = [str(run["ckpt"]) if a == "CKPT" else a for a in argv]
    assert model.main(argv) == 2
    assert fragment in capsys.readouterr().err


def _metrics_folder(folder, digest, psnr):
    """An evaluation folder: a one-subject metrics.csv of the checkpoint ``digest``, its metrics.json."""
    folder.mkdir()
    keys = ("psnr_fair", "ssim_fair", "psnr_tricubic_fair", "ssim_tricubic_fair")
    (folder / "metrics.csv").write_text("subject," + ",".join(keys) + f"\ns1,{psnr},0.9,20.0,0.8\n")
    (folder / "metrics.json").write_text(json.dumps({"checkpoint_sha256": digest}))
    return folder


def test_the_card_finds_the_recorded_evaluation_first_then_the_default_folder(tmp_path):
    digest = "0123456789abcdef" * 4
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    default = _metrics_folder(tmp_path / "volumes", digest[:16], 31.0)  # an earlier version's short digest
    assert export.checkpoint_evaluation(str(ckpt), str(default), digest)["psnr_fair"] == 31.0
    recorded = _metrics_folder(tmp_path / "recorded", digest, 32.0)
    run_records.write_evaluation_record(str(ckpt), str(recorded / "metrics.csv"), str(recorded / "report.html"),
                                        digest)
    assert export.checkpoint_evaluation(str(ckpt), str(default), digest)["psnr_fair"] == 32.0
    # Another checkpoint's evaluation is not this one's.
    assert export.checkpoint_evaluation(str(ckpt), str(default), "f" * 64) is None


def test_the_card_reports_the_last_evaluation_of_that_checkpoint(run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run["ckpt"], ckpt)
    # Other tests' evaluations of the shared run record themselves there: this copy starts without one.
    (ckpt / run_records.EVALUATION_NAME).unlink(missing_ok=True)
    path = tmp_path / "m.keras"
    assert model.main(["-export", str(path), "-checkpoint_dir_restore", str(ckpt)]) == 0
    assert model_file.read_metadata(str(path))["evaluation"] is None
    # Evaluated elsewhere (as the demo does, into demo/volumes): the folder's record finds it.
    elsewhere = tmp_path / "elsewhere"
    assert model.main(["-evaluate", "True", "-checkpoint_dir_restore", str(ckpt), "-path_volumes", str(elsewhere)]) == 0
    assert json.loads((ckpt / run_records.EVALUATION_NAME).read_text())["metrics"] == str(elsewhere / "metrics.csv")
    assert model.main(["-export", str(path), "-checkpoint_dir_restore", str(ckpt)]) == 0
    scores = model_file.read_metadata(str(path))["evaluation"]
    assert scores["subjects"] == 1 and np.isfinite(scores["psnr_fair"]) and np.isfinite(scores["ssim_tricubic_fair"])
    assert f"SR PSNR {scores['psnr_fair']:.2f} dB" in model_file.read_metadata(str(path))["model_card"]


@pytest.mark.parametrize("training, text", [
    ({"steps": 59, "epochs": 5, "epochs_done": 2, "epoch_batches": 19}, "epoch 3 of 5, 19 batches in (step 59)"),
    ({"steps": 60, "epochs": 5, "epochs_done": 3, "epoch_batches": 0}, "3 of 5 epochs (step 60)"),
    ({"steps": 59, "epochs": 5}, "step 59 of a run of 5 epochs"),  # a file of an earlier version
])
def test_the_card_gives_the_checkpoints_own_epoch(training, text):
    assert model_file.progress_text(training) == text


def test_the_card_of_a_best_checkpoint_gives_its_epoch_not_the_runs_total(run, tmp_path, capsys):
    import shutil

    import validation

    folder = tmp_path / "run"
    shutil.copytree(run["ckpt"], folder, ignore=shutil.ignore_patterns("logs", "predictions"))
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "epochs": 5}))  # the run goes on to 5
    validation.BestCheckpoint(str(folder)).replace(str(folder / "ckpt-16"), {"step": 16, "psnr_fair": 20.0})
    path = tmp_path / "best.keras"
    assert model.main(["-export", str(path), "-checkpoint_dir_restore", str(folder / "best")]) == 0
    card = model_file.read_metadata(str(path))["model_card"]
    assert "trained: 1 of 5 epochs (step 16)," in card and "steps, 5 epochs" not in card
