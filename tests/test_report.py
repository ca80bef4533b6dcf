"""report.html (report.py, report_figures.py) and the run's records it draws (run_records.py)."""

import base64
import html.parser
import io
import json
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import checkpoints
import durable
import inference
import metrics
import model
import outputs
import report
import report_figures
import run_records
import utils
from folders import new_folders, removed_unless_written

# A subject named with the characters HTML must escape.
AWKWARD = 's<b>&"x'
VOID = {"meta", "img", "br", "hr", "input", "link"}


class Page(html.parser.HTMLParser):
    """A strict reading of a page: tags must nest; what the tests check is collected."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.stack, self.images, self.links, self.headings, self.cells = [], [], [], {}, []
        self.heading = None
        self.feed(text)
        self.close()
        assert self.stack == [], f"unclosed tags {self.stack}"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "img":
            self.images.append(attrs["src"])
        if "href" in attrs:
            self.links.append(attrs["href"])
        if tag in ("h2", "h3"):
            self.heading = [tag, ""]
        if tag == "td" and "data-column" in attrs:
            self.cells.append([self.headings.get("h3"), attrs["data-column"], ""])

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag in ("h2", "h3") and self.heading:
            self.headings[tag] = self.heading[1]
            if tag == "h2":
                self.headings["h3"] = None
            self.heading = None

    def handle_data(self, data):
        if self.heading:
            self.heading[1] += data
        if self.stack and self.stack[-1] == "td" and self.cells and not self.cells[-1][2]:
            self.cells[-1][2] = data

    def subjects(self):
        """The h3 headings of the Subjects section, in order."""
        return list(dict.fromkeys(h for h, _, _ in self.cells if h not in (None, "By the original's rule")))


@pytest.fixture(scope="module")
def resumed(run, tmp_path_factory):
    """An evaluation of the shared run stopped after one subject and resumed: two subjects, one awkwardly named."""
    root = tmp_path_factory.mktemp("report")
    data = root / "data"
    (test,) = json.loads((run["ckpt"] / "split.json").read_text())["test"]
    shutil.copytree(run["data"] / test, data / test)
    out = root / "out"
    argv = ["-evaluate", "True", "-checkpoint_dir_restore", str(run["ckpt"]), "-data_path", str(data),
            "-path_volumes", str(out)]
    assert model.main(argv) == 0
    shutil.copytree(run["data"] / test, data / AWKWARD)  # a subject added: the evaluation resumes
    lines = []
    model.run(model.parse_command(argv, log=lines.append), log=lines.append)
    text = (out / outputs.REPORT_NAME).read_text()
    return {"out": out, "text": text, "page": Page(text), "log": lines, "subjects": [test, AWKWARD]}


def test_a_resumed_evaluations_report_covers_every_subject(resumed):
    assert any(line.startswith("resuming: 1 of 2") for line in resumed["log"])
    assert resumed["log"][-1] == f"report: {resumed['out'] / 'report.html'}"
    assert resumed["page"].subjects() == sorted(resumed["subjects"])


def test_the_reports_numbers_are_metrics_csvs(resumed):
    table = pd.read_csv(resumed["out"] / "metrics.csv")
    decimals = {m.prefix: m.decimals for m in report.MEASURES + (report.BIAS,)}
    rows = table.set_index("subject")
    summaries = [c for c in resumed["page"].cells if c[0] is None or c[0] == "By the original's rule"]
    # Every column but the bias in intensities (the page shows it in % of the range, bias*_fair).
    assert {name for _, name, _ in summaries} == {c for c in metrics.METRIC_COLUMNS[1:]
                                                   if not (c.startswith("bias") and not c.endswith("_fair"))}
    for _, name, text in summaries:
        d = decimals[name.split("_")[0]]
        assert text == f"{table[name].mean():.{d}f} ± {table[name].std(ddof=1):.{d}f}", name
    per_subject = [c for c in resumed["page"].cells if c not in summaries]
    assert len(per_subject) == 2 * 20  # 4 methods x (PSNR, SSIM: fair and original; bias: fair)
    for subject, name, text in per_subject:
        assert text == f"{rows.loc[subject, name]:.{decimals[name.split('_')[0]]}f}", (subject, name)


def test_every_embedded_image_decodes(resumed):
    images = resumed["page"].images
    assert len(images) == 3  # two subjects, the run's curves
    for src in images:
        assert src.startswith("data:image/png;base64,")
        picture = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        picture.verify()
        assert picture.size[0] > 200


def test_the_report_needs_nothing_from_elsewhere(resumed):
    text = resumed["text"]
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.IGNORECASE)
    assert "@import" not in text and "<script" not in text.lower() and "<link" not in text.lower()
    assert "url(" not in text
    # Its one link is relative: it survives the folder being copied.
    assert resumed["page"].links == ["metrics.csv"]


def test_user_strings_are_escaped(resumed):
    assert AWKWARD not in resumed["text"] and "s&lt;b&gt;&amp;&quot;x" in resumed["text"]
    assert AWKWARD in resumed["page"].subjects()


def test_the_report_renders_in_a_real_browser(resumed):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    with tempfile.TemporaryDirectory() as profile:
        shot = os.path.join(profile, "shot.png")
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                   f"--screenshot={shot}", "--window-size=1200,2000",
                   (resumed["out"] / outputs.REPORT_NAME).resolve().as_uri()]
        browser = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            browser.wait(timeout=90)
        finally:
            if browser.poll() is None:
                browser.kill()
                browser.wait()
        pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1200)
    # Text, tables and figures: far from a blank (or one-colour) page.
    assert pixels.std() > 20 and (pixels < 100).mean() > 0.01


# ----------------------------------------------------------------------------
# Units: no network, no TensorFlow work
# ----------------------------------------------------------------------------

def test_a_bias_column_is_shown_by_its_name():
    columns = list(metrics.metric_columns())
    rows = [{c: (f"s{i}" if c == "subject" else float(i + j)) for j, c in enumerate(columns)} for i in range(3)]
    page = Page(report.summary_table(rows, (inference.Variant(),), columns, fair=True))
    shown = {name: text for _, name, text in page.cells}
    assert shown["bias_tricubic_fair"] == f"{np.mean([r['bias_tricubic_fair'] for r in rows]):.2f} ± 1.00"
    assert "bias (% of range)" in report.summary_table(rows, (inference.Variant(),), columns, True)
    # Without such columns (an earlier version's metrics.csv) the table is the PSNR/SSIM one.
    earlier = list(metrics.without_bias(columns))
    assert "bias" not in report.summary_table(rows, (inference.Variant(),), earlier, True)


def test_the_nearest_planes_of_a_scan_are_those_of_its_upsampled_volume():
    lr = np.random.default_rng(0).random((9, 10, 6)).astype(np.float32)
    for factor, shape in ((2, (18, 20, 12)), ((1, 1, 4), (9, 10, 24))):
        expected = report_figures.mid_planes(utils.upsample_baseline(lr, factor, 0, shape))
        for got, want in zip(report_figures.nearest_planes(lr, factor, shape), expected):
            np.testing.assert_array_equal(got, want)


def test_the_runs_curves_come_from_its_folder_or_the_run_above_best(tmp_path):
    run_dir, best = tmp_path / "run", tmp_path / "run" / "best"
    best.mkdir(parents=True)
    for folder in (run_dir, best):
        (folder / "config.json").write_text('{"seed": 0}')
    run_records.append_epoch_losses(run_dir, 1, 16, {"d_loss": 1.0, "g_loss": 9.0, "mse": 5.0, "gdl": 3.0,
                                                     "adv": 0.5, "flipped": 1.0}, 2.0)
    run_records.append_epoch_losses(run_dir, 1, 16, {"d_loss": 2.0, "g_loss": 8.0, "mse": 4.0, "gdl": 3.0,
                                                     "adv": 0.5}, 2.0)  # epoch 1 again (an older restore)
    (run_dir / "validation.csv").write_text("step,epoch,psnr_fair,ssim_fair,psnr_tricubic_fair,subjects,best,"
                                            "seconds\n8,0.5,20.0,0.8,21.0,2,1,0.1\n16,1.0,22.5,0.85,21.0,2,1,0.1\n")
    (losses,) = run_records.read_numbers(run_dir / "losses.csv", "epoch")
    assert losses["d_loss"] == 2.0  # the last row of an epoch wins
    assert run_records.run_folder(str(best / "ckpt-16")) == str(run_dir)
    assert run_records.run_folder(str(run_dir / "ckpt-16")) == str(run_dir)
    (best / "config.json").write_text('{"seed": 1}')  # not a copy: another run's folder
    assert run_records.run_folder(str(best / "ckpt-16")) is None
    section = report.run_section(str(run_dir / "ckpt-16"))
    assert "Best validation: step 16, PSNR 22.50 dB" in section and section.count("data:image/png") == 1


def test_older_short_digests_still_resume_and_match(tmp_path):
    digest = "0123456789abcdef" * 4
    assert checkpoints.same_digest(digest[:16], digest) and checkpoints.same_digest(digest, digest[:16])
    assert not checkpoints.same_digest(digest[:8], digest) and not checkpoints.same_digest(None, digest)
    path = str(tmp_path / "metrics.csv")
    older = metrics.MetricsFile(path, ("subject", "psnr"), {"checkpoint_sha256": digest[:16]})
    older.append({"subject": "s1", "psnr": 30.0})
    assert metrics.MetricsFile(path, ("subject", "psnr"), {"checkpoint_sha256": digest}).done() == {"s1"}
    described = [{"Name": "srgan3d-tf2", "Description": f"checkpoint c (step 8, sha256 {digest[:16]})"}]
    assert outputs.same_generator(described, [dict(described[0], Description=f"checkpoint c (step 8, sha256 {digest})")])
    assert not outputs.same_generator(described, [dict(described[0], Description="checkpoint c (step 8, sha256 "
                                                                                  f"{'f' * 64})")])


def test_a_failed_run_leaves_no_folder_of_its_own_making(tmp_path):
    target = tmp_path / "a" / "b"
    created = new_folders(target)
    assert created == [str(tmp_path / "a"), str(target)]
    with pytest.raises(ValueError):
        with durable.RunLock(target, "test"), removed_unless_written(created, ("README.md",)):
            (target / "README.md").write_text("ours")
            raise ValueError("the only input is unreadable")
    assert not (tmp_path / "a").exists()
    # A folder holding something else is left as it is.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "theirs.txt").write_text("x")
    with pytest.raises(ValueError):
        with removed_unless_written([str(tmp_path / "c")]):
            raise ValueError
    assert (tmp_path / "c" / "theirs.txt").exists()
