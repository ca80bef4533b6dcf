"""Tests of the data layouts (layouts.py): ADNI folders and bad subjects, detection, BIDS, CSV lists, split."""

import gzip
import os
import struct

import nibabel as nib
import numpy as np
import pytest
from helpers import Log, write_nifti

import layouts
import nifti_io
import splits


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


@pytest.mark.parametrize("path, expected", [
    ("list.csv", True), ("a/b/LIST.TSV", True), ("list.Csv", True), ("list.csv.gz", False),
    ("csv", False), ("scan.nii.gz", False), ("folder", False),
])
def test_is_file_list(tmp_path, path, expected):
    assert layouts.is_file_list(path) is expected
    assert layouts.is_file_list(tmp_path / path) is expected  # path-like, need not exist


def test_detect_layout_bad_paths_are_data_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(nifti_io.DataError, match=r"notes.txt.*is a file, not a folder \(or a .csv file list\)"):
        layouts.detect_layout(tmp_path / "notes.txt")
    with pytest.raises(nifti_io.DataError, match="nope.*does not exist"):
        layouts.detect_layout(tmp_path / "nope")


# --------------------------------------------------------------------------- #
# Folders (the ADNI layout, flat NIfTI files) and bad subjects
# --------------------------------------------------------------------------- #


def _subject(root, name, data, mask=None, dtype=np.float32):
    folder = os.path.join(root, name)
    write_nifti(os.path.join(folder, layouts.IMAGE_NAME), data, dtype=dtype)
    if mask is not None:
        write_nifti(os.path.join(folder, layouts.MASK_NAME), mask, dtype=np.uint8)
    return folder


def test_find_subjects_layouts_and_sorting(tmp_path):
    root = str(tmp_path)
    vol = np.ones((8, 8, 8), np.float32)
    for name in ("s10", "s02", "s1"):
        _subject(root, name, vol, mask=vol)
    with open(os.path.join(root, "ADNI_clinical.csv"), "w") as fh:
        fh.write("subject,age\ns1,70\n")
    with open(os.path.join(root, "notes.txt"), "w") as fh:
        fh.write("stray")
    log = Log()
    subjects, problems = layouts.find_subjects(root, log=log)
    assert [s.name for s in subjects] == ["s02", "s1", "s10"]
    assert problems == [] and log.lines == [f"data: ADNI layout (one folder per subject) {root} "
                                            f"(3 subjects, 3 with a brain mask)"]
    assert all(s.mask_path and s.mask_path.endswith(layouts.MASK_NAME) for s in subjects)

    flat = tmp_path / "flat"
    write_nifti(str(flat / "b.nii.gz"), vol)
    write_nifti(str(flat / "a.nii"), vol)
    subjects, problems = layouts.find_subjects(str(flat), log=log)
    assert [s.name for s in subjects] == ["a", "b"] and all(s.mask_path is None for s in subjects)

    custom = tmp_path / "custom"
    write_nifti(str(custom / "x" / "img.nii.gz"), vol)
    write_nifti(str(custom / "x" / "brainmask.nii.gz"), vol)
    subjects, _ = layouts.find_subjects(str(custom), image_name="img.nii.gz", mask_name="brainmask.nii.gz", log=log)
    assert subjects[0].mask_path.endswith("brainmask.nii.gz")


def test_bad_subjects_are_reported_once_and_skipped(tmp_path):
    root = str(tmp_path)
    good = np.ones((8, 8, 8), np.float32)
    _subject(root, "a_good", good, mask=good)
    _subject(root, "b_nomask", good)
    _subject(root, "c_4d_many", np.ones((8, 8, 8, 3), np.float32))
    _subject(root, "c_4d_one", np.ones((8, 8, 8, 1), np.float32), mask=good)
    os.makedirs(os.path.join(root, "d_empty_folder"))
    _subject(root, "e_small", np.ones((4, 8, 8), np.float32), mask=np.ones((4, 8, 8)))
    _subject(root, "f_mask_shape", good, mask=np.ones((8, 8, 7)))
    for name, size in (("g_zero_voxel", 0.0), ("g_negative_voxel", -1.0), ("g_nan_voxel", float("nan"))):
        # nibabel repairs zero/negative voxel sizes when saving, so patch the header bytes.
        path = os.path.join(_subject(root, name, good), layouts.IMAGE_NAME)
        raw = bytearray(gzip.decompress(open(path, "rb").read()))
        raw[84:88] = struct.pack("<f", size)  # pixdim[2] of the NIfTI-1 header
        open(path, "wb").write(gzip.compress(bytes(raw)))
    with open(os.path.join(root, "h_garbage.nii.gz"), "wb") as fh:
        fh.write(b"not a nifti at all")
    write_nifti(os.path.join(root, "i_wrong_name", layouts.IMAGE_NAME.replace(".gz", "")), good)
    write_nifti(os.path.join(root, "j_empty", layouts.IMAGE_NAME), np.ones((8, 0, 8), np.float32))
    with open(os.path.join(root, "clinical.csv"), "w") as fh:
        fh.write("a,b\n")

    log = Log()
    subjects, problems = layouts.find_subjects(root, image_name=layouts.IMAGE_NAME, min_shape=(6, 6, 6), log=log)
    assert [s.name for s in subjects] == ["a_good", "b_nomask", "c_4d_one"]
    assert subjects[1].mask_path is None
    reasons = {
        "c_4d_many": "8x8x8x3", "d_empty_folder": "no image", "e_small": "smaller than the minimum 6x6x6",
        "f_mask_shape": "mask shape 8x8x7", "g_zero_voxel": "voxel sizes must be positive", "g_negative_voxel": "got (1.0, -1.0, 1.0)",
        "g_nan_voxel": "voxel sizes must be positive",
        "h_garbage": "cannot read", "i_wrong_name": "no image", "j_empty": "empty volume",
    }
    assert len(problems) == len(reasons)
    for name, reason in reasons.items():
        line = [p for p in problems if name in p]
        assert len(line) == 1 and reason in line[0], (name, problems)
        assert line[0].startswith(root)
    summaries = [m for m in log.lines if "bad subject" in m]
    assert len(summaries) == 1 and all(p in summaries[0] for p in problems)
    no_mask = [m for m in log.lines if "image > 0" in m]
    assert len(no_mask) == 1 and no_mask[0].startswith("1 of 3")

    # The uncompressed file shorter than its header says is caught from its size.
    flat = tmp_path / "flat"
    short = write_nifti(str(flat / "s.nii"), good)
    os.truncate(short, os.path.getsize(short) - 100)
    write_nifti(str(flat / "t.nii"), good)
    subjects, problems = layouts.find_subjects(str(flat), log=Log())
    assert [s.name for s in subjects] == ["t"] and "truncated" in problems[0]


def test_no_usable_subject_is_data_error_naming_the_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(nifti_io.DataError, match="nope.*does not exist"):
        layouts.find_subjects(missing, log=Log())
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(nifti_io.DataError, match=r"file.txt.*is a file, not a folder \(or a .csv file list\)"):
        layouts.find_subjects(str(a_file), log=Log())
    # A .csv file is a file list now: one without an image column says so.
    (tmp_path / "file.csv").write_text("x")
    with pytest.raises(nifti_io.DataError, match="file.csv: no 'image' column"):
        layouts.find_subjects(str(tmp_path / "file.csv"), log=Log())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(nifti_io.DataError, match="no usable subject in .*empty"):
        layouts.find_subjects(str(empty), log=Log())
    (empty / "clinical.csv").write_text("a,b\n")
    os.makedirs(empty / "sub01")
    with pytest.raises(nifti_io.DataError, match="sub01.*no image"):
        layouts.find_subjects(str(empty), log=Log())
    assert issubclass(nifti_io.DataError, ValueError)


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
    train, test = splits.split_subjects(subjects, train_fraction=0.5)
    assert [s.name for s in train] == ["c", "s_a"] and [s.name for s in test] == ["b"]

    # Without a split column the 80/20 rule applies; a .tsv is tab-separated.
    tsv = lists / "list.tsv"
    tsv.write_text("image\n../data/a.nii.gz\n../data/b.nii.gz\n../data/c.nii.gz\n")
    log = Log()
    subjects, _ = layouts.find_subjects(str(tsv), image_name="img.nii.gz", mask_name="m.nii.gz", log=log)
    assert [(s.name, s.split) for s in subjects] == [("a", None), ("b", None), ("c", None)]
    assert "note: -image_name 'img.nii.gz' and -mask_name 'm.nii.gz' not used for a CSV file list" in log.lines
    assert [len(x) for x in splits.split_subjects(subjects)] == [2, 1]


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
        "../data/gone.nii.gz,,c2,train\n"        # row 7: no such image either
        "../data/b.nii.gz,,dup,test\n"           # rows 8 and 9: same subject ID
        "../data/c.nii.gz,,dup,train\n"
        "../data/broken.nii.gz,,,test\n"         # row 10: header check fails
        "../data/b.nii.gz,,a/b,test\n")          # row 11: not usable in a file name
    log = Log()
    subjects, problems = layouts.find_subjects(str(path), log=log)
    assert [s.name for s in subjects] == ["a"]
    expected = {
        3: "image '../data/missing.nii.gz' not found", 4: "empty image cell",
        5: "mask '../data/nomask.nii.gz' not found", 6: "empty split cell", 7: "image '../data/gone.nii.gz' not found",
        8: "subject 'dup' is also row 9's", 9: "subject 'dup' is also row 8's",
        10: "broken.nii.gz: cannot read the NIfTI header", 11: "subject 'a/b' cannot be used in file names",
    }
    assert len(problems) == len(expected)
    for row, reason in expected.items():
        line = [p for p in problems if p.startswith(f"{path} row {row}: ")]
        assert len(line) == 1 and reason in line[0], (row, problems)
    summary = [m for m in log.lines if "bad subject" in m]
    assert len(summary) == 1 and "Skipping 9 bad subject(s) of 10" in summary[0]


def test_csv_unknown_split_values_refuse_the_list_and_validation_rows_are_neither_train_nor_test(tmp_path):
    # A value this version does not know would change the split silently (0 test subjects).
    data, lists = _csv_dataset(tmp_path)
    path = lists / "list.csv"
    path.write_text("image,split\n../data/a.nii.gz,train\n../data/b.nii.gz,val\n")
    with pytest.raises(nifti_io.DataError,
                       match=r"list.csv row 3: split 'val' must be one of train, validation, test"):
        layouts.find_subjects(str(path), log=Log())
    path.write_text("image,split\n../data/a.nii.gz,train\n../data/b.nii.gz,Validation\n../data/c.nii.gz,test\n")
    subjects, _ = layouts.find_subjects(str(path), log=Log())
    train, test = splits.split_subjects(subjects)
    assert [s.name for s in train] == ["a"] and [s.name for s in test] == ["c"]
    assert [s.name for s in splits.marked_validation(subjects)] == ["b"]


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


def test_csv_list_of_an_adni_tree_names_subjects_by_their_folders(tmp_path):
    # Every file of an ADNI tree has the same name: without a subject column the
    # subjects are named by the folder that tells them apart, and the first log line says so.
    for site, subject in (("siteA", "002_S_0295"), ("siteA", "002_S_0413"), ("siteB", "002_S_0295")):
        _nifti(tmp_path / "DATA" / site / subject / layouts.IMAGE_NAME)
        _nifti(tmp_path / "DATA" / site / subject / layouts.MASK_NAME, dtype=np.uint8)
    path = tmp_path / "list.csv"
    rows = [f"DATA/{site}/{subject}/{layouts.IMAGE_NAME},DATA/{site}/{subject}/{layouts.MASK_NAME}"
            for site, subject in (("siteA", "002_S_0295"), ("siteA", "002_S_0413"))]
    path.write_text("image,mask\n" + "\n".join(rows) + "\n")
    log = Log()
    subjects, problems = layouts.find_subjects(str(path), log=log)
    assert problems == [] and [s.name for s in subjects] == ["002_S_0295", "002_S_0413"]
    assert log.lines[0].startswith("data: CSV file list (subject IDs from the images' folders, e.g. 002_S_0295")
    # Two sites with the same subject folder: one more folder is joined with "_".
    path.write_text("image\n" + "\n".join(f"DATA/{site}/{subject}/{layouts.IMAGE_NAME}" for site, subject in (
        ("siteA", "002_S_0295"), ("siteA", "002_S_0413"), ("siteB", "002_S_0295"))) + "\n")
    subjects, problems = layouts.find_subjects(str(path), log=Log())
    assert [s.name for s in subjects] == ["siteA_002_S_0295", "siteA_002_S_0413", "siteB_002_S_0295"]
    # The same file twice is the one true duplicate: its second row is refused.
    path.write_text("image\n" + "\n".join([rows[0].split(",")[0], rows[1].split(",")[0], rows[0].split(",")[0]]) + "\n")
    subjects, problems = layouts.find_subjects(str(path), log=Log())
    assert [s.name for s in subjects] == ["002_S_0295", "002_S_0413"]
    assert len(problems) == 1 and "row 4: the same image as row 2" in problems[0]
