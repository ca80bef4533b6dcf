"""Evaluation (evaluation.py, metrics.py) and -super_resolve (super_resolve.py) of a trained checkpoint."""

import json

import nibabel as nib
import numpy as np
import pytest

import durable
import evaluation
import inference
import layouts
import metrics
import model
import phantoms
import train_dataset as td


def test_evaluate_writes_volumes_on_source_grid_metrics_and_pngs(run, tmp_path):
    out = tmp_path / "volumes"
    argv = ["-evaluate", "True", "-checkpoint_dir_restore", str(run["ckpt"]), "-path_volumes", str(out)]
    assert model.main(argv) == 0
    split = json.loads((run["ckpt"] / "split.json").read_text())
    (name,) = split["test"]
    source = nib.load(str(run["data"] / name / layouts.IMAGE_NAME))
    for kind in ("sr", "hr"):
        img = nib.load(str(out / f"{name}_{kind}.nii.gz"))
        assert img.shape == source.shape
        np.testing.assert_allclose(img.affine, source.affine, atol=1e-5)
    lr = nib.load(str(out / f"{name}_lr.nii.gz"))
    assert lr.shape == (16, 16, 12)
    np.testing.assert_allclose(lr.header.get_zooms()[:3], 2 * np.array(source.header.get_zooms()[:3]),
                               rtol=1e-5)
    # LR voxel i lies where source voxel offset + 2*i lies: the LR overlays the HR in a viewer.
    offset = td.canonical_grid(source.shape, (32, 32, 24)).offset()
    for i in [(0, 0, 0), (3, 5, 7), (15, 15, 11)]:
        np.testing.assert_allclose(lr.affine @ np.r_[i, 1],
                                   source.affine @ np.r_[offset + 2 * np.array(i), 1], atol=1e-4)
    _, rows = durable.read_csv_rows(out / "metrics.csv")  # after its "# setting: value" lines
    assert list(rows[0]) == list(metrics.METRIC_COLUMNS) and rows[0]["subject"] == name
    assert all(np.isfinite(float(rows[0][k])) for k in metrics.METRIC_COLUMNS[1:])
    assert (out / f"{name}_slices.png").stat().st_size > 100
    # The HR written equals the source inside the canonical region.
    hr = nib.load(str(out / f"{name}_hr.nii.gz")).get_fdata()
    src = source.get_fdata()
    inside = hr != 0
    np.testing.assert_allclose(hr[inside], src[inside], rtol=1e-5)


def test_evaluate_with_mismatched_architecture_is_a_clear_error(run, tmp_path, capsys):
    argv = ["-evaluate", "True", "-checkpoint_dir_restore", str(run["ckpt"]), "-residual_blocks", "3",
            "-path_volumes", str(tmp_path)]
    assert model.main(argv) == 2
    assert "-residual_blocks 3, the checkpoint uses -residual_blocks 1" in capsys.readouterr().err


def test_super_resolve_shape_and_affine(run, tmp_path):
    affine = np.array([[0.0, -2.0, 0.0, 40.0], [2.2, 0.0, 0.0, -30.0], [0.0, 0.0, 2.4, 10.0], [0, 0, 0, 1]])
    scan = np.random.default_rng(0).uniform(0, 300, (11, 9, 7)).astype(np.float32)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(scan, affine), str(path))
    argv = ["-super_resolve", str(path), "-checkpoint_dir_restore", str(run["ckpt"]),
            "-path_volumes", str(tmp_path / "out")]
    assert model.main(argv) == 0
    sr = nib.load(str(tmp_path / "out" / "scan_sr.nii.gz"))
    assert sr.shape == (22, 18, 14)
    np.testing.assert_allclose(sr.affine, affine @ np.diag([0.5, 0.5, 0.5, 1.0]), atol=1e-5)
    assert np.all(np.isfinite(sr.get_fdata()))


def test_empty_checkpoint_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert model.main(["-evaluate", "True", "-checkpoint_dir_restore", str(tmp_path / "empty")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


def test_unwritable_output_folder_is_a_clear_error(run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    argv = ["-evaluate", "True", "-checkpoint_dir_restore", str(run["ckpt"]),
            "-path_volumes", str(blocker / "sub")]
    assert model.main(argv) == 2
    assert "-path_volumes" in capsys.readouterr().err


def test_super_resolve_volume_stitches_patches_exactly():
    # An identity-like "generator" (nearest upsampling) makes stitching visible.
    def predict(x):
        x = np.asarray(x)
        return np.repeat(np.repeat(np.repeat(x, 2, 1), 2, 2), 2, 3)
    lr = np.random.default_rng(0).normal(size=(13, 11, 9)).astype(np.float32)
    sr = inference.super_resolve_volume(predict, lr, 2, (8, 8, 6), 2, batch_size=3)
    np.testing.assert_array_equal(sr, np.repeat(np.repeat(np.repeat(lr, 2, 0), 2, 1), 2, 2))


def test_fair_metrics_use_the_references_range_for_every_method():
    rng = np.random.default_rng(0)
    hr = rng.uniform(0, 100, (12, 12, 10)).astype(np.float32)
    mask = np.ones(hr.shape, bool)
    close = hr + rng.normal(0, 2, hr.shape).astype(np.float32)
    overshoot = close.copy()
    overshoot[0, 0, 0] = 1000.0  # one wild voxel enlarges its own max - min
    row = metrics.subject_metrics(hr, {"sr": close, "tricubic": overshoot}, mask)
    assert set(row) == set(metrics.METRIC_COLUMNS[1:]) - {
        f"{m}_{s}{t}" for m in ("psnr", "ssim", "bias") for s in ("nearest", "trilinear") for t in ("", "_fair")}
    mse = np.mean((overshoot.astype(np.float64) - hr) ** 2)
    expected_fair = 10 * np.log10(float(hr.max() - hr.min()) ** 2 / mse)
    assert row["psnr_tricubic_fair"] == pytest.approx(expected_fair, rel=1e-6)
    # The original's rule rewards the overshoot with a larger range; the fair one does not.
    assert row["psnr_tricubic"] > row["psnr_tricubic_fair"] + 10
    # The two rules differ by exactly the ratio of the ranges they use.
    both = max(hr.max(), close.max()) - min(hr.min(), close.min())
    assert row["psnr"] - row["psnr_fair"] == pytest.approx(20 * np.log10(both / (hr.max() - hr.min())), rel=1e-6)


@pytest.mark.parametrize("offset", [-37.5, 0.0, 12.25])
def test_a_constant_offset_gives_exactly_that_bias(offset):
    rng = np.random.default_rng(1)
    hr = rng.uniform(0, 200, (10, 10, 8)).astype(np.float32)
    mask = np.zeros(hr.shape, bool)
    mask[2:8, 2:8, 2:6] = True
    shifted = np.where(mask, hr + np.float32(offset), -500.0).astype(np.float32)  # outside the mask: ignored
    row = metrics.subject_metrics(hr, {"sr": shifted, "nearest": hr}, mask)
    assert row["bias"] == pytest.approx(offset, abs=1e-4) and row["bias_nearest"] == 0.0
    assert row["bias_fair"] == pytest.approx(100 * offset / float(hr.max() - hr.min()), abs=1e-5)
    # Hidden in the PSNR: the offset is all of its error (over the whole masked volume).
    if offset:
        mse = offset ** 2 * mask.mean()
        assert row["psnr_fair"] == pytest.approx(10 * np.log10(float(hr.max() - hr.min()) ** 2 / mse), rel=1e-4)
    assert np.isnan(metrics.bias_metrics(hr, shifted, np.zeros(hr.shape, bool))[0])


def test_an_earlier_metrics_csv_without_bias_columns_resumes_in_its_own_columns(tmp_path):
    path = str(tmp_path / "metrics.csv")
    settings = {"program": "p", "blend": "crop"}
    old = metrics.without_bias(metrics.METRIC_COLUMNS)
    durable.write_json(str(tmp_path / "metrics.json"), settings)
    durable.append_csv_row(path, old, {"subject": "s1", "psnr": 30.0})
    resumed = metrics.MetricsFile(path, metrics.METRIC_COLUMNS, settings)
    assert resumed.done() == {"s1"}
    resumed.append({"subject": "s2", "psnr": 31.0, "bias": 2.0, "bias_fair": 0.1})
    fieldnames, rows = durable.read_csv_rows(path)
    assert tuple(fieldnames) == old and [r["subject"] for r in rows] == ["s1", "s2"]


def test_the_summary_and_the_mosaic_lead_with_the_fair_comparison():
    methods = ("", "_sr_crop", "_tricubic", "_trilinear", "_nearest")
    rows = [{"subject": f"s{i}", **{f"{m}{s}{t}": base + i + (0.5 if t else 0.0)
                                   for s, base in zip(methods, (30.0, 29.0, 28.0, 27.0, 25.0))
                                   for m in ("psnr", "ssim") for t in ("", "_fair")}} for i in range(2)]
    variants = inference.inference_variants("crop", "flip")
    lines = metrics.summary_lines(rows, variants)
    assert "2 subject(s)" in lines[0] and "one data range for every method" in lines[0]
    table = [line.split() for line in lines[2:7]]
    assert [row[:2] for row in table] == [["SR", "crop"], ["SR", "crop+flip"], ["tricubic", "29.0000"],
                                          ["trilinear", "28.0000"], ["nearest", "26.0000"]]
    assert table[1][2:4] == ["*", "31.0000"]  # written as _sr; the fair PSNR (30 + 0.5 + mean of i) first
    assert table[1][-4] == "30.5000"  # then the original's rule
    assert table[1][-2:] == ["|", "-"]  # no bias columns in these rows (an earlier version's file)
    assert lines[7] == "  (* written as _sr)" and any(line.startswith("PSNR: mean 30.5000") for line in lines)
    header = evaluation.mosaic_header(layouts.Subject("s0", "s0.nii.gz"), rows[0])
    assert header == "s0  SR PSNR 30.50 dB SSIM 30.5000 | tricubic PSNR 28.50 dB SSIM 28.5000 (one data range)"


def test_degenerate_images_are_not_scored(run, tmp_path, capsys):
    data = tmp_path / "data"
    phantoms.make_demo_data(str(data), subjects=1, shape=(34, 30, 26), seed=4)
    for name in ("tiny_a", "tiny_b"):
        (data / name).mkdir()
        nib.save(nib.Nifti1Image(np.full((1, 1, 1), 50.0, np.float32), np.eye(4)),
                 str(data / name / layouts.IMAGE_NAME))
    out = tmp_path / "out"
    assert model.main(["-evaluate", "True", "-checkpoint_dir_restore", str(run["ckpt"]), "-data_path", str(data),
                       "-path_volumes", str(out)]) == 0
    text = capsys.readouterr().out
    assert "skipping tiny_a" in text and "image 1x1x1 is smaller than one patch's worth" in text
    _, rows = durable.read_csv_rows(out / "metrics.csv")
    assert [r["subject"] for r in rows] == ["demo_000"]


def test_an_evaluation_folder_is_not_resumed_with_the_other_layout(run, tmp_path, capsys):
    out = tmp_path / "volumes"
    argv = ["-evaluate", "True", "-checkpoint_dir_restore", str(run["ckpt"]), "-path_volumes", str(out)]
    assert model.main(argv + ["-output_layout", "bids"]) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    capsys.readouterr()
    for layout, held in (("plain", "bids"), ("auto", "bids")):  # auto: plain names for this ADNI data
        assert model.main(argv + ["-output_layout", layout]) == 2
        err = capsys.readouterr().err
        assert f"holds an evaluation with {held} names (metrics.csv and dataset_description.json)" in err
        assert "Resume it with -output_layout bids" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert model.main(argv + ["-output_layout", "bids"]) == 0  # the same layout resumes
    assert "resuming: 1 of 1 subject(s)" in capsys.readouterr().out
