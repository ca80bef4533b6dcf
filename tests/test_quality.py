"""Tests of benchmarks/quality.py: the realistic-data builder and its command line."""

import importlib.util
import json
import os

import nibabel as nib
import numpy as np
import pytest

import config
import layouts
import nifti_io

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "quality.py")
_spec = importlib.util.spec_from_file_location("quality", _PATH)
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)

SHAPE = (24, 24, 20)


def _write_template(path, shape=SHAPE):
    """Writes a float32 ellipsoid 'brain' (white-matter core 0.9, grey shell 0.6, 0 outside).

    Centred on the grid so its bounding-box centre is the grid centre: with no
    transform the builder's grid then maps onto the template voxel for voxel.
    """
    idx = np.indices(shape, dtype=np.float64)
    centre = (np.asarray(shape) - 1) / 2.0
    r = np.sqrt(sum(((idx[a] - centre[a]) / s) ** 2 for a, s in enumerate((9.0, 9.0, 7.0))))
    image = np.where(r <= 1, np.where(r <= 0.6, 0.9, 0.6), 0.0).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-12.0, -20.0, 7.0)
    nib.save(nib.Nifti1Image(image, affine), str(path))
    return image


def _read(folder):
    image = nib.load(os.path.join(folder, layouts.IMAGE_NAME))
    mask = nib.load(os.path.join(folder, layouts.MASK_NAME))
    return image, mask


def _build(tmp_path, name, **kwargs):
    template = tmp_path / "template.nii.gz"
    if not template.exists():
        _write_template(template)
    kwargs.setdefault("shape", SHAPE)
    kwargs.setdefault("subjects", 2)
    return quality.build_dataset(tmp_path / name, template=template, log=lambda m: None, **kwargs)


def _data(folders):
    return [(np.asarray(_read(f)[0].dataobj), np.asarray(_read(f)[1].dataobj)) for f in folders]


def test_build_is_deterministic_for_a_seed(tmp_path):
    first = _data(_build(tmp_path, "a", seed=3))
    again = _data(_build(tmp_path, "b", seed=3))
    other = _data(_build(tmp_path, "c", seed=4))
    fewer = _data(_build(tmp_path, "d", seed=3, subjects=1))
    for (img, mask), (img2, mask2) in zip(first, again):
        assert img.tobytes() == img2.tobytes()
        assert mask.tobytes() == mask2.tobytes()
    # Subject i depends only on (seed, i): a smaller build repeats its subjects.
    assert fewer[0][0].tobytes() == first[0][0].tobytes()
    for (img, _), (img2, _) in zip(first, other):
        assert not np.array_equal(img, img2)
    assert not np.array_equal(first[0][0], first[1][0]), "two subjects of one seed must differ"


def test_build_writes_valid_adni_layout_subjects(tmp_path):
    folders = _build(tmp_path, "data", subjects=3, seed=0)
    out = tmp_path / "data"
    assert folders == sorted(str(out / f"mni_{i:03d}") for i in range(3))
    subjects, problems = layouts.find_subjects(out, log=lambda m: None)
    assert problems == []
    assert [s.name for s in subjects] == ["mni_000", "mni_001", "mni_002"]
    for subject in subjects:
        assert subject.mask_path is not None
        image, mask = _read(os.path.dirname(subject.image_path))
        data, m = np.asarray(image.dataobj), np.asarray(mask.dataobj)
        assert image.get_data_dtype() == np.int16 and data.dtype == np.int16
        assert mask.get_data_dtype() == np.uint8 and m.dtype == np.uint8
        assert data.shape == SHAPE and m.shape == SHAPE
        assert set(np.unique(m)) == {0, 1}
        assert not np.any((data != 0) & (m == 0)), "image must be zero outside the mask"
        assert data.min() >= 0
        assert np.mean(data[m > 0] > 0) > 0.99
        assert not np.allclose(image.affine, np.eye(4))
        np.testing.assert_allclose(image.affine, mask.affine)
        np.testing.assert_allclose(image.header.get_zooms(), (1.0, 1.0, 1.0))
        np.testing.assert_allclose(np.sqrt((image.affine[:3, :3] ** 2).sum(0)), 1.0)
    record = json.loads((out / quality.BUILD_RECORD).read_text())
    assert record["seed"] == 0 and record["shape"] == list(SHAPE)
    assert [r["subject"] for r in record["subject_params"]] == ["mni_000", "mni_001", "mni_002"]


def test_untransformed_subject_is_the_template_scaled_to_white_matter_1000(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "MAX_TRANSLATION_MM", 0.0)
    folders = _build(tmp_path, "plain", subjects=1, noise=0.0, bias=0.0, max_rotation_deg=0,
                     scale_range=(1, 1))
    template = np.asarray(nib.load(tmp_path / "template.nii.gz").dataobj)
    (image, mask), = _data(folders)
    # Cubic B-splines interpolate: on the template's own voxels they return it exactly.
    np.testing.assert_array_equal(mask, (template > 0).astype(np.uint8))
    np.testing.assert_array_equal(image, np.rint(template / 0.9 * 1000).astype(np.int16))


@pytest.mark.parametrize("bias", [0.0, 0.3, 0.8])
def test_bias_field_spans_its_peak_to_peak_amplitude(tmp_path, monkeypatch, bias):
    monkeypatch.setattr(quality, "MAX_TRANSLATION_MM", 0.0)
    kwargs = dict(subjects=1, seed=5, noise=0.0, max_rotation_deg=0, scale_range=(1, 1))
    (clean, mask), = _data(_build(tmp_path, "clean", bias=0.0, **kwargs))
    (biased, _), = _data(_build(tmp_path, f"bias{bias}", bias=bias, **kwargs))
    ratio = biased[mask > 0] / clean[mask > 0]
    # Rounding to integers (values 600-1000) moves a ratio by at most ~1e-3.
    assert ratio.min() == pytest.approx(1 - bias / 2, abs=2e-3)
    assert ratio.max() == pytest.approx(1 + bias / 2, abs=2e-3)


def test_noise_sigma_is_the_given_fraction_of_white_matter(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "MAX_TRANSLATION_MM", 0.0)
    kwargs = dict(subjects=1, seed=1, bias=0.0, max_rotation_deg=0, scale_range=(1, 1))
    (clean, mask), = _data(_build(tmp_path, "clean", noise=0.0, **kwargs))
    (noisy, _), = _data(_build(tmp_path, "noisy", noise=0.05, **kwargs))
    diff = (noisy.astype(np.float64) - clean)[mask > 0]
    # sigma = 0.05 x 1000; at SNR >= 12 Rician noise is nearly Gaussian with that sigma.
    assert np.std(diff) == pytest.approx(50, rel=0.15)
    assert abs(np.mean(diff)) < 10


def test_default_template_is_nilearns_mni152(tmp_path):
    pytest.importorskip("nilearn")
    shape = (40, 48, 40)
    folders = quality.build_dataset(tmp_path / "mni", subjects=1, seed=0, shape=shape, log=lambda m: None)
    (image, mask), = _data(folders)
    assert image.shape == shape
    # The grid is centred on the brain, and a 40x48x40 mm grid lies inside it.
    assert mask.mean() > 0.9
    brain = image[mask > 0]
    # MNI152 T1 contrast: a wide spread from CSF/grey matter up to white matter near 1000.
    assert 850 < np.percentile(brain, 90) < 1200
    assert np.percentile(brain, 5) < 0.7 * np.percentile(brain, 90)
    record = json.loads((tmp_path / "mni" / quality.BUILD_RECORD).read_text())
    assert record["template"] is None
    assert record["template_wm"] == pytest.approx(0.867, abs=0.02)


@pytest.mark.parametrize("kwargs, match", [
    (dict(subjects=0), "subjects"),
    (dict(subjects=True), "subjects"),
    (dict(seed=-1), "seed"),
    (dict(shape=(24, 24)), "shape"),
    (dict(shape=(4, 24, 24)), "shape"),
    (dict(shape="abc"), "shape"),
    (dict(noise=-0.1), "noise"),
    (dict(noise=float("nan")), "noise"),
    (dict(bias=2.0), "bias"),
    (dict(max_rotation_deg=-1), "max_rotation_deg"),
    (dict(scale_range=(1.1, 0.9)), "scale_range"),
    (dict(scale_range=(0, 1)), "scale_range"),
    (dict(scale_range=1.0), "scale_range"),
])
def test_build_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _build(tmp_path, "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def test_build_rejects_bad_templates(tmp_path):
    missing = tmp_path / "missing.nii.gz"
    with pytest.raises(nifti_io.DataError, match="missing.nii.gz"):
        quality.build_dataset(tmp_path / "out", template=missing, shape=SHAPE, log=lambda m: None)
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4)), str(empty))
    with pytest.raises(nifti_io.DataError, match="no voxel > 0"):
        quality.build_dataset(tmp_path / "out", template=empty, shape=SHAPE, log=lambda m: None)
    series = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(SHAPE + (2,), np.float32), np.eye(4)), str(series))
    with pytest.raises(nifti_io.DataError, match="3-D"):
        quality.build_dataset(tmp_path / "out", template=series, shape=SHAPE, log=lambda m: None)


def test_cli_build_matches_the_function(tmp_path):
    template = tmp_path / "template.nii.gz"
    _write_template(template)
    rc = quality.main(["build", "--out", str(tmp_path / "cli"), "--subjects", "2", "--seed", "7",
                       "--shape", "24,24,20", "--template", str(template)])
    assert rc == 0
    expected = _data(_build(tmp_path, "fn", subjects=2, seed=7))
    got = _data([tmp_path / "cli" / "mni_000", tmp_path / "cli" / "mni_001"])
    for (img, mask), (img2, mask2) in zip(expected, got):
        np.testing.assert_array_equal(img, img2)
        np.testing.assert_array_equal(mask, mask2)


@pytest.mark.parametrize("argv", [
    ["build"],                                          # --out missing
    ["build", "--out", "x", "--shape", "24,24"],
    ["build", "--out", "x", "--scale-range", "0.9"],
    ["train"],                                          # no such step
])
def test_cli_rejects_bad_flags(argv, capsys):
    with pytest.raises(SystemExit) as e:
        quality.main(argv)
    assert e.value.code == 2


def test_cli_reports_bad_values_without_a_traceback(tmp_path, capsys):
    rc = quality.main(["build", "--out", str(tmp_path / "x"), "--subjects", "0"])
    assert rc == 2
    assert "subjects 0 must be an integer >= 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# run: settings, table, end to end
# --------------------------------------------------------------------------- #


def _run_args(*extra):
    return quality.make_parser().parse_args(["run", "--out", "o", *extra])


def test_run_settings_quick_presets_and_explicit_flags():
    s = quality.run_settings(_run_args("--quick"))
    assert (s["geometry"], s["subjects"], s["steps"], s["eval_every"]) == ("quick", 10, 150, 50)
    assert s["volume_shape"] == (64, 64, 48) and s["data_shape"] == (64, 64, 48)
    s = quality.run_settings(_run_args("--quick", "--steps", "40", "--subjects", "6"))
    assert (s["steps"], s["subjects"], s["eval_every"]) == (40, 6, 50)
    s = quality.run_settings(_run_args("--steps", "30"))
    assert s["geometry"] == "crop96" and s["eval_every"] == 3 and s["factor"] == 4
    s = quality.run_settings(_run_args("--geometry", "default", "--patch-shape", "64,64,48"))
    assert s["geometry"] == "custom" and s["patch_shape"] == (64, 64, 48)
    assert s["volume_shape"] == (224, 224, 152) and s["data_shape"] == (224, 224, 152)
    assert quality.run_settings(_run_args("--geometry", "default"))["data_shape"] is None


def test_run_settings_pass_the_gan_phase_rate_to_the_model():
    assert quality.run_settings(_run_args())["gan_lr_scale"] == config.defaults()["gan_lr_scale"]
    s = quality.run_settings(_run_args("--gan-lr-scale", "0.5"))
    argv = quality.model_argv(s, "data", "ckpt", 3)
    assert argv[argv.index("-gan_lr_scale") + 1] == "0.5"
    # A run recorded before the setting existed trained at the legacy rate.
    assert quality.gan_lr_scale_of({}) == config.LEGACY_VALUES["gan_lr_scale"] != s["gan_lr_scale"]


@pytest.mark.parametrize("extra, match", [
    (["--steps", "0"], "--steps"),
    (["--eval-every", "0"], "--eval-every"),
    (["--subjects", "1"], "--subjects"),
    (["--train-fraction", "1"], "--train-fraction"),
    (["--pretrain-steps", "-1"], "--pretrain-steps"),
    (["--gan-lr-scale", "0"], "--gan-lr-scale 0.0 must be in"),
    (["--factor", "4", "--patch-shape", "30,32,32"], "--patch-shape 30,32,32: x = 30 is not divisible by the factor 4"),
    (["--factor", "4", "--margin", "6"], "--margin"),
])
def test_run_settings_reject_bad_values(extra, match):
    with pytest.raises(ValueError, match=match):
        quality.run_settings(_run_args(*extra))


def test_summarize_gives_mean_and_sample_sd_per_method():
    rows = []
    for i, v in enumerate((1.0, 3.0)):
        row = {"subject": f"s{i}"}
        for j, suffix in enumerate(("", "_nearest", "_trilinear", "_tricubic")):
            row[f"psnr{suffix}_fair"], row[f"ssim{suffix}_fair"] = 20 + j + v, 0.5 + 0.1 * v
            row[f"psnr{suffix}"], row[f"ssim{suffix}"] = 30 + j + v, 0.6
        rows.append(row)
    table = quality.summarize(rows)
    assert [r["method"] for r in table] == ["GAN", "nearest", "trilinear", "tricubic"]
    assert table[0]["psnr_fair_mean"] == pytest.approx(22.0)
    assert table[0]["psnr_fair_sd"] == pytest.approx(np.sqrt(2.0))  # ddof 1
    assert table[3]["psnr_mean"] == pytest.approx(35.0)
    paired = quality.paired_difference(rows)
    assert paired["psnr"][0] == pytest.approx(-3.0) and paired["psnr"][1] == pytest.approx(0.0)
    assert paired["psnr_wins"] == 0 and paired["n"] == 2


def test_run_refuses_a_folder_that_holds_a_run_or_other_data(tmp_path):
    template = tmp_path / "template.nii.gz"
    _write_template(template)
    out = tmp_path / "exp"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint").write_text("x")
    base = ["run", "--template", str(template), "--volume-shape", "16,16,16", "--patch-shape", "8,8,8",
            "--margin", "0", "--factor", "2", "--subjects", "3"]
    with pytest.raises(ValueError, match="already holds a run"):
        quality.run_experiment(quality.run_settings(quality.make_parser().parse_args(base + ["--out", str(out)])))
    other = tmp_path / "other"
    _build(tmp_path, "other/data", subjects=3, seed=5, shape=(16, 16, 16))
    with pytest.raises(ValueError, match="another build"):
        quality.prepare_data(quality.run_settings(quality.make_parser().parse_args(
            base + ["--out", str(other)])), log=lambda m: None)


def test_run_end_to_end_writes_table_curve_and_plot(tmp_path):
    """A tiny run through the real trainer and the real evaluation command (~20 s)."""
    pytest.importorskip("matplotlib")  # requirements.txt (report.html) and the learning-curve PNG
    template = tmp_path / "template.nii.gz"
    _write_template(template)
    out = tmp_path / "exp"
    rc = quality.main(["run", "--out", str(out), "--template", str(template), "--subjects", "5",
                       "--train-fraction", "0.6", "--validation-fraction", "0.3",
                       "--volume-shape", "16,16,16", "--patch-shape", "8,8,8",
                       "--margin", "0", "--factor", "2", "--feature-size", "4", "--residual-blocks", "1",
                       "--steps", "10", "--eval-every", "6", "--seed", "1"])
    assert rc == 0
    text = (out / "table.md").read_text()
    for column in ("PSNR fair", "SSIM fair", "PSNR original rule", "SSIM original rule"):
        assert column in text
    results = json.loads((out / "results.json").read_text())
    best = results["best"]
    for method in ("GAN last (step 10)", f"GAN best (step {best['step']}, by validation)", "nearest",
                   "trilinear", "tricubic"):
        assert f"| {method} |" in text
    for fact in ("×2", "subpixel", "10 steps", "learning rate 0.0001", "pretrain steps 0",
                 "2 train / 1 validation / 2 test", "wall time", "GPU", "Period-2 error pattern",
                 "GAN best - tricubic, paired over the 2 test subjects"):
        assert fact in text
    header, *lines = (out / "table.csv").read_text().splitlines()
    assert tuple(header.split(",")) == quality.TABLE_COLUMNS
    assert [line.split(",")[0] for line in lines] == ["GAN last", "GAN best", "nearest", "trilinear", "tricubic"]
    # The best row is the command line's evaluation of the checkpoint validation liked most.
    validated = {c["step"]: c["val_psnr_fair"] for c in results["curve"]}
    assert best["step"] == max(validated, key=validated.get)
    assert best["validation_psnr_fair"] == pytest.approx(validated[best["step"]], abs=1e-6)
    assert len(best["subjects"]) == 2 and (out / "volumes_best" / "metrics.csv").exists()
    assert all(np.isfinite(float(v)) for line in lines for v in line.split(",")[1:])
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 8 patches per volume, 2 training subjects: 8 steps per epoch, so 10 steps cross an epoch.
    assert [c["step"] for c in results["curve"]] == [6, 10]
    assert results["info"]["batches_per_epoch"] == 8
    # The in-process learning curve and the evaluation command agree on the last checkpoint.
    assert abs(results["last_curve_minus_cli_psnr_fair"]) < 1e-3
    losses = (out / "losses.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in losses[1:]] == list(range(1, 11))
    assert len(results["subjects"]) == 2
    assert set(results["error_phase_pattern"]) == {"GAN", "tricubic"}

    # compare: one row per run and a plot.
    assert quality.main(["compare", str(out), str(out), "--table", str(tmp_path / "all.md"),
                         "--png", str(tmp_path / "all.png")]) == 0
    rows = (tmp_path / "all.md").read_text().splitlines()
    assert len(rows) == 4 and rows[2].startswith("| x2 subpixel, lr 0.0001 | 10 |")
    assert rows[2].split("|")[-2].strip().startswith(f"{best['step']}, ")
    assert (tmp_path / "all.png").read_bytes()[:4] == b"\x89PNG"
    assert quality.main(["compare", str(tmp_path), "--table", str(tmp_path / "x.md")]) == 2


def test_error_phase_pattern_measures_a_checkerboard():
    hr = np.random.default_rng(0).uniform(50, 150, (16, 16, 12))
    mask = np.ones(hr.shape, bool)
    assert quality.error_phase_pattern(hr + 3.0, hr, mask, 2)[0] == pytest.approx(0.0, abs=1e-9)
    flat = np.full(hr.shape, 100.0)
    board = flat.copy()
    board[1::2, :, :] += 4.0  # odd x planes 4 % brighter: a period-2 pattern along x
    amplitude, pattern = quality.error_phase_pattern(board, flat, mask, 2)
    np.testing.assert_allclose(pattern[1], 4.0)
    np.testing.assert_allclose(pattern[0], 0.0, atol=1e-12)
    assert amplitude == pytest.approx(2.0)
    # Only the masked voxels count.
    board[0, 0, 0] += 1000.0
    assert quality.error_phase_pattern(board, flat, mask, 2)[0] != pytest.approx(2.0)
    mask[0, 0, 0] = False
    assert quality.error_phase_pattern(board, flat, mask, 2)[0] == pytest.approx(2.0)


def _seed_results(gan, tricubic, best_step=None):
    """A results.json of one seed: two test subjects with these fair PSNRs (GAN, tricubic)."""
    rows = [{"subject": f"s{i}", "psnr_fair": g, "psnr_tricubic_fair": t, "ssim_fair": 0.9 + 0.01 * (g - t),
             "ssim_tricubic_fair": 0.9, "bias_fair": 0.5 * (g - t), "bias_tricubic_fair": 0.0}
            for i, (g, t) in enumerate(zip(gan, tricubic))]
    best = {"step": best_step, "subjects": [dict(r, psnr_fair=r["psnr_fair"] + 1) for r in rows]} if best_step else None
    return {"settings": {"steps": 100}, "subjects": rows, "best": best}


GAN_BY_SEED = {0: (31.5, 29.0), 1: (28.0, 30.5), 2: (30.0, 30.0)}  # tricubic 30.0 on both subjects


def test_seeds_run_each_seed_once_on_one_dataset_and_count_the_pairs_won(tmp_path, monkeypatch):
    calls = []

    def fake_run(s, log=print):
        calls.append((s["seed"], s["data"]))
        gan = GAN_BY_SEED[s["seed"]]
        os.makedirs(s["out"], exist_ok=True)
        with open(os.path.join(s["out"], "results.json"), "w") as fh:
            json.dump(_seed_results(gan, (30.0, 30.0), best_step=50), fh)

    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setattr(quality, "run_experiment", fake_run)
    args = _run_args("--seeds", "0,1,2", "--data", str(data))
    args.out = str(tmp_path / "seeds")
    s = quality.run_settings(args)
    summary = quality.run_seeds(s, args.seeds, log=lambda m: None)
    assert calls == [(0, str(data)), (1, str(data)), (2, str(data))]  # one dataset, each seed once
    last = summary["last"]
    gan = np.concatenate([GAN_BY_SEED[k] for k in (0, 1, 2)])
    assert last["pairs"] == 6 and last["psnr_wins"] == 2 and last["seeds_won"] == 1  # seed 0's mean only
    assert last["gan"]["psnr"] == pytest.approx((np.mean(gan), np.std(gan, ddof=1)))
    assert last["difference"]["psnr"][1] == pytest.approx(np.std(gan - 30.0, ddof=1))
    assert last["gan"]["bias"][0] == pytest.approx(np.mean(0.5 * (gan - 30.0)))
    assert summary["best"]["psnr_wins"] == 4 and summary["best"]["per_seed"][0]["step"] == 50
    table = (tmp_path / "seeds" / "table.md").read_text()
    assert f"| last | 6 | {np.mean(gan):.2f} ± {np.std(gan, ddof=1):.2f} | 30.00 ± 0.00 |" in table
    assert "(2/6)" in table and "| 1/3 |" in table and "| 3/3 |" in table  # best: every seed +1 dB
    # Run again: every seed is done, nothing is trained twice.
    quality.run_seeds(s, args.seeds, log=lambda m: None)
    assert len(calls) == 3


def test_seeds_flag_keeps_the_data_seed_apart_from_the_training_seed():
    assert quality.run_settings(_run_args("--seeds", "3,4"))["data_seed"] == 0
    assert quality.run_settings(_run_args("--seed", "5"))["data_seed"] == 5  # as before: one seed for both
    assert quality.run_settings(_run_args("--seeds", "3,4", "--data-seed", "7"))["data_seed"] == 7
