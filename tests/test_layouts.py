"""Tests of the input layouts of layouts.find_subjects: BIDS, CSV lists, detection, split."""

import os

import nibabel as nib
import numpy as np
import pytest

import layouts
import nifti_io
from helpers import Log


def _nifti(path, shape=(8, 8, 8), dtype=np.float32):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones(shape, dtype), np.eye(4)), str(path))
    return str(path)


def _bids_root(tmp_path):
    """Two subjects, one with two sessions (one with a brain mask), plus entries to ignore."""
    root = tmp_path / "bids"
    os.makedirs(root)
    (root / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.8.0"}')
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    _nifti(root / "sub-01/ses-M00/anat/sub-01_ses-M00_T1w.nii.gz")
    _nifti(root / "sub-01/ses-M00/anat/sub-01_ses-M00_desc-brain_mask.nii.gz", dtype=np.uint8)
    _nifti(root / "sub-01/ses-M12/anat/sub-01_ses-M12_T1w.nii")
    _nifti(root / "sub-01/ses-M12/anat/sub-01_ses-M12_T2w.nii.gz")  # not a T1w
    _nifti(root / "sub-02/anat/sub-02_T1w.nii.gz")
    # Never scanned: derivatives/, sourcedata/, and a session without anatomy.
    _nifti(root / "derivatives/pipe/sub-03/anat/sub-03_T1w.nii.gz")
    _nifti(root / "sourcedata/sub-04/anat/sub-04_T1w.nii.gz")
    _nifti(root / "sub-01/ses-M24/pet/sub-01_ses-M24_pet.nii.gz")
    return str(root)


# --------------------------------------------------------------------------- #
# Detection
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("make, expected", [
    (lambda p: (p / "list.csv").write_text("image\n") and p / "list.csv", "csv"),
    (lambda p: (p / "LIST.TSV").write_text("image\n") and p / "LIST.TSV", "csv"),
    (lambda p: (p / "dataset_description.json").write_text("{}") and p, "bids"),
    (lambda p: os.makedirs(p / "sub-01") or p, "bids"),
    (lambda p: os.makedirs(p / "002_S_0295") or (p / "x.nii.gz").write_text("x") and p, "folders"),
    # ADNI-layout subjects that are called sub-* stay the ADNI layout.
    (lambda p: _nifti(p / "sub-01" / layouts.IMAGE_NAME) and p, "folders"),
])
def test_detect_layout(tmp_path, make, expected):
    assert layouts.detect_layout(make(tmp_path)) == expected


def test_detect_layout_bad_paths_are_data_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(nifti_io.DataError, match=r"notes.txt.*is a file, not a folder \(or a .csv file list\)"):
        layouts.detect_layout(tmp_path / "notes.txt")
    with pytest.raises(nifti_io.DataError, match="nope.*does not exist"):
        layouts.detect_layout(tmp_path / "nope")


# --------------------------------------------------------------------------- #
# BIDS
# --------------------------------------------------------------------------- #


def test_bids_dataset_is_found_with_ids_entities_and_masks(tmp_path):
    root = _bids_root(tmp_path)
    log = Log()
    subjects, problems = layouts.find_subjects(root, log=log)
    assert problems == []
    assert [s.name for s in subjects] == ["sub-01_ses-M00", "sub-01_ses-M12", "sub-02"]
    assert [s.entities for s in subjects] == [
        (("sub", "01"), ("ses", "M00")), (("sub", "01"), ("ses", "M12")), (("sub", "02"),)]
    assert subjects[0].mask_path == os.path.join(root, "sub-01/ses-M00/anat/sub-01_ses-M00_desc-brain_mask.nii.gz")
    assert subjects[1].mask_path is None and subjects[2].mask_path is None
    assert subjects[1].image_path == os.path.join(root, "sub-01/ses-M12/anat/sub-01_ses-M12_T1w.nii")
    assert all(s.split is None for s in subjects)
    assert log.lines[0] == f"data: BIDS dataset {root} (3 subject-sessions, 1 with a brain mask)"
    assert any("sub-01_ses-M24" in m and "without an anat/*_T1w" in m for m in log.lines)
    assert any(m.startswith("2 of 3 subject(s) have no *_desc-brain_mask") for m in log.lines)
    assert "derivatives" not in log.text and "sub-03" not in log.text


def test_bids_filter_and_mask_rules(tmp_path):
    root = tmp_path / "bids"
    anat = root / "sub-01" / "anat"
    _nifti(anat / "sub-01_T1w.nii.gz")
    _nifti(anat / "sub-01_desc-brain_T1w.nii.gz")
    _nifti(anat / "sub-01_desc-brain_mask.nii.gz", dtype=np.uint8)
    # A mask on another grid (space-MNI) never fits a native image, whatever its shape.
    _nifti(anat / "sub-01_space-MNI_desc-brain_mask.nii.gz", shape=(9, 9, 9), dtype=np.uint8)
    _nifti(root / "sub-02/anat/sub-02_acq-fast_desc-brain_T1w.nii.gz")
    _nifti(root / "sub-03/anat/sub-04_desc-brain_T1w.nii.gz")  # name disagrees with its folder

    subjects, problems = layouts.find_subjects(str(root), log=Log())
    assert [s.name for s in subjects] == ["sub-02"]  # the only one with a single T1w
    several = [p for p in problems if "sub-01" in p]
    assert len(several) == 1 and "2 T1w files" in several[0] and "-bids_filter desc-brain" in several[0]
    assert any("sub-03" in p and "sub-04" in p and "do not match its folder" in p for p in problems)

    log = Log()
    subjects, problems = layouts.find_subjects(str(root), bids_filter="desc-brain", log=log)
    assert [s.name for s in subjects] == ["sub-01", "sub-02"]
    assert subjects[0].image_path.endswith("sub-01_desc-brain_T1w.nii.gz")
    assert subjects[0].mask_path.endswith("sub-01_desc-brain_mask.nii.gz")
    assert subjects[0].entities == (("sub", "01"), ("desc", "brain"))
    assert subjects[1].entities == (("sub", "02"), ("acq", "fast"), ("desc", "brain"))

    # Every filter entity must be in the name; a session left with none is a bad entry.
    subjects, problems = layouts.find_subjects(str(root), bids_filter=" desc-brain , acq-fast", log=Log())
    assert [s.name for s in subjects] == ["sub-02"]
    assert any("sub-01" in p and "has the entities of -bids_filter desc-brain,acq-fast" in p for p in problems)

    # A user -mask_name is a glob in the anat folder; {subject} is the label.
    _nifti(root / "sub-02/anat/sub-02_brainmask.nii.gz", dtype=np.uint8)
    subjects, _ = layouts.find_subjects(str(root), bids_filter="desc-brain", mask_name="sub-{subject}_brainmask.nii*",
                                        log=Log())
    assert subjects[0].mask_path is None and subjects[1].mask_path.endswith("sub-02_brainmask.nii.gz")
    _, problems = layouts.find_subjects(str(root), bids_filter="desc-brain", mask_name="*mask.nii.gz", log=Log())
    assert any("sub-01" in p and "2 files match -mask_name" in p for p in problems)
    with pytest.raises(ValueError, match=r"-mask_name.*\{subject\} and \{session\}"):
        layouts.find_subjects(str(root), mask_name="{participant}_mask.nii.gz", log=Log())


def test_bids_entities_come_from_the_folders_first(tmp_path):
    root = tmp_path / "bids"
    _nifti(root / "sub-05/ses-A/anat/sub-05_run-2_T1w.nii.gz")  # the name omits ses-A
    _nifti(root / "sub-06/ses-B/anat/sub-06_ses-C_T1w.nii.gz")  # the name contradicts its folder
    subjects, problems = layouts.find_subjects(str(root), log=Log())
    assert [(s.name, s.entities) for s in subjects] == [
        ("sub-05_ses-A", (("sub", "05"), ("ses", "A"), ("run", "2")))]
    assert len(problems) == 1 and "ses-C" in problems[0] and "do not match its folder sub-06_ses-B" in problems[0]


@pytest.mark.parametrize("text, expected", [
    (None, ()), ("", ()), ("desc-brain", (("desc", "brain"),)),
    ("desc-brain,acq-mprage", (("desc", "brain"), ("acq", "mprage"))),
    ("run-01, ses-M00", (("run", "01"), ("ses", "M00"))),
])
def test_parse_bids_filter(text, expected):
    assert layouts.parse_bids_filter(text) == expected


@pytest.mark.parametrize("text, bad", [
    ("desc=brain", "'desc=brain'"), ("desc-brain,", "''"), ("desc-brain;acq-x", "'desc-brain;acq-x'"),
    ("desc-brain,desc-preproc", "'desc' is given twice"), ("T1w", "'T1w'"), ("desc-br-ain", "'desc-br-ain'"),
])
def test_bad_bids_filter_is_value_error_naming_the_token(text, bad):
    with pytest.raises(ValueError, match=bad):
        layouts.parse_bids_filter(text)


def test_bids_without_t1w_and_filter_elsewhere_are_data_errors(tmp_path):
    root = tmp_path / "bids"
    (root / "sub-01" / "anat").mkdir(parents=True)
    (root / "dataset_description.json").write_text("{}")
    _nifti(root / "sub-01/anat/sub-01_T2w.nii.gz")
    _nifti(root / "derivatives/sub-01/anat/sub-01_T1w.nii.gz")  # not scanned
    with pytest.raises(nifti_io.DataError, match=r"BIDS dataset .*bids' has no T1w image: looked for "
                                                 r"sub-<label>/\[ses-<label>/\]anat/\*_T1w\.nii\[\.gz\]"):
        layouts.find_subjects(str(root), log=Log())
    folders = tmp_path / "adni"
    _nifti(folders / "s1" / layouts.IMAGE_NAME)
    with pytest.raises(nifti_io.DataError, match="-bids_filter 'desc-brain' applies to BIDS datasets"):
        layouts.find_subjects(str(folders), bids_filter="desc-brain", log=Log())


# --------------------------------------------------------------------------- #
# CSV file lists
# --------------------------------------------------------------------------- #


def _csv_dataset(tmp_path):
    data = tmp_path / "data"
    for name in ("a", "b", "c"):
        _nifti(data / f"{name}.nii.gz")
    _nifti(data / "a_mask.nii.gz", dtype=np.uint8)
    lists = tmp_path / "lists"
    lists.mkdir()
    return data, lists


def test_csv_list_with_relative_paths_and_split_column_is_honoured(tmp_path):
    data, lists = _csv_dataset(tmp_path)
    path = lists / "list.csv"
    path.write_text(
        "Image,Mask,Subject,Split,age\n"
        "../data/a.nii.gz,../data/a_mask.nii.gz,s_a,Train,71\n"
        f"{data / 'b.nii.gz'},,,test,70\n"  # absolute path, default subject ID
        "\n"  # blank rows are skipped
        "../data/c.nii.gz,, ,TRAIN,\n")
    log = Log()
    subjects, problems = layouts.find_subjects(str(path), log=log)
    assert problems == []
    assert [(s.name, s.split) for s in subjects] == [("b", "test"), ("c", "train"), ("s_a", "train")]
    assert subjects[2].image_path == str(data / "a.nii.gz")  # relative to the list's folder
    assert os.path.samefile(subjects[2].mask_path, data / "a_mask.nii.gz")
    assert subjects[0].mask_path is None and subjects[0].entities == ()
    assert log.lines[0] == f"data: CSV file list {path} (3 subjects, 1 with a brain mask)"
    train, test = layouts.split_subjects(subjects, train_fraction=0.5)
    assert [s.name for s in train] == ["c", "s_a"] and [s.name for s in test] == ["b"]

    # Without a split column the 80/20 rule applies; a .tsv is tab-separated.
    tsv = lists / "list.tsv"
    tsv.write_text("image\n../data/a.nii.gz\n../data/b.nii.gz\n../data/c.nii.gz\n")
    log = Log()
    subjects, _ = layouts.find_subjects(str(tsv), image_name="img.nii.gz", mask_name="m.nii.gz", log=log)
    assert [(s.name, s.split) for s in subjects] == [("a", None), ("b", None), ("c", None)]
    assert "note: -image_name 'img.nii.gz' and -mask_name 'm.nii.gz' not used for a CSV file list" in log.lines
    assert [len(x) for x in layouts.split_subjects(subjects)] == [2, 1]


def test_csv_bad_rows_are_named_and_skipped(tmp_path):
    data, lists = _csv_dataset(tmp_path)
    (data / "broken.nii.gz").write_bytes(b"not a nifti")
    path = lists / "list.csv"
    path.write_text(
        "image,mask,subject,split\n"
        "../data/a.nii.gz,,,train\n"            # row 2: fine
        "../data/missing.nii.gz,,,train\n"      # row 3: no such image
        ",,x,train\n"                            # row 4: empty image cell
        "../data/b.nii.gz,../data/nomask.nii.gz,,test\n"  # row 5: no such mask
        "../data/c.nii.gz,,,\n"                  # row 6: empty split
        "../data/c.nii.gz,,c2,val\n"             # row 7: unknown split
        "../data/b.nii.gz,,dup,test\n"           # rows 8 and 9: same subject ID
        "../data/c.nii.gz,,dup,train\n"
        "../data/broken.nii.gz,,,test\n"         # row 10: header check fails
        "../data/b.nii.gz,,a/b,test\n")          # row 11: not usable in a file name
    log = Log()
    subjects, problems = layouts.find_subjects(str(path), log=log)
    assert [s.name for s in subjects] == ["a"]
    expected = {
        3: "image '../data/missing.nii.gz' not found", 4: "empty image cell",
        5: "mask '../data/nomask.nii.gz' not found", 6: "empty split cell", 7: "split 'val' must be train or test",
        8: "subject 'dup' is also row 9's", 9: "subject 'dup' is also row 8's",
        10: "broken.nii.gz: cannot read the NIfTI header", 11: "subject 'a/b' cannot be used in file names",
    }
    assert len(problems) == len(expected)
    for row, reason in expected.items():
        line = [p for p in problems if p.startswith(f"{path} row {row}: ")]
        assert len(line) == 1 and reason in line[0], (row, problems)
    summary = [m for m in log.lines if "bad subject" in m]
    assert len(summary) == 1 and "Skipping 9 bad subject(s) of 10" in summary[0]


def test_csv_missing_image_column_or_no_usable_row_is_data_error(tmp_path):
    data, lists = _csv_dataset(tmp_path)
    path = lists / "list.csv"
    path.write_text("path,mask\n../data/a.nii.gz,\n")
    with pytest.raises(nifti_io.DataError, match=r"list.csv: no 'image' column in the header row \['path', 'mask'\]"):
        layouts.find_subjects(str(path), log=Log())
    path.write_text("")
    with pytest.raises(nifti_io.DataError, match="list.csv: the file list is empty"):
        layouts.find_subjects(str(path), log=Log())
    path.write_text("image,image\na,b\n")
    with pytest.raises(nifti_io.DataError, match="2 'image' columns"):
        layouts.find_subjects(str(path), log=Log())
    path.write_text("image\n../data/gone.nii.gz\n")
    with pytest.raises(nifti_io.DataError, match=r"no usable subject in .*list.csv.*row 2: image '../data/gone.nii.gz' "
                                                 r"not found"):
        layouts.find_subjects(str(path), log=Log())


# --------------------------------------------------------------------------- #
# Split
# --------------------------------------------------------------------------- #


def test_split_honours_subject_split_and_refuses_a_partial_one():
    subjects = [layouts.Subject(f"s{i}", f"/x/{i}", split=s) for i, s in enumerate(["test", "train", "train", "test"])]
    train, test = layouts.split_subjects(subjects[::-1], train_fraction=1.0)
    assert [s.name for s in train] == ["s1", "s2"] and [s.name for s in test] == ["s0", "s3"]
    with pytest.raises(ValueError, match="2 subject.*carry a train/test split and 1 do not"):
        layouts.split_subjects(subjects[:2] + [layouts.Subject("s9", "/x/9")])
    with pytest.raises(ValueError, match="split 'val'"):
        layouts.split_subjects([layouts.Subject("a", "/a", split="val")])
    with pytest.raises(ValueError, match="train_fraction"):
        layouts.split_subjects(subjects, 0)
