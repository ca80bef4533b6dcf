"""Splits: train / validation / test, deterministic, kept by split.json (splits.py)."""

import json

import pytest
from helpers import Log

import config
import layouts
import splits
from errors import UserError


def test_split_honours_subject_split_and_refuses_a_partial_one():
    subjects = [layouts.Subject(f"s{i}", f"/x/{i}", split=s) for i, s in enumerate(["test", "train", "train", "test"])]
    train, test = splits.split_subjects(subjects[::-1], train_fraction=1.0)
    assert [s.name for s in train] == ["s1", "s2"] and [s.name for s in test] == ["s0", "s3"]
    with pytest.raises(ValueError, match="2 subject.*carry a split and 1 do not"):
        splits.split_subjects(subjects[:2] + [layouts.Subject("s9", "/x/9")])
    with pytest.raises(ValueError, match="split 'val'"):
        splits.split_subjects([layouts.Subject("a", "/a", split="val")])
    with pytest.raises(ValueError, match="train_fraction"):
        splits.split_subjects(subjects, 0)


def test_split_is_deterministic_and_never_leaves_a_list_empty():
    subjects = [layouts.Subject(f"s{i:03d}", f"/x/{i}", None) for i in range(589)]
    train, test = splits.split_subjects(subjects[::-1])
    assert (len(train), len(test)) == (471, 118)
    assert [s.name for s in train + test] == sorted(s.name for s in subjects)
    assert splits.split_subjects(subjects) == (train, test)
    assert [len(x) for x in splits.split_subjects(subjects[:2], 0.99)] == [1, 1]
    assert [len(x) for x in splits.split_subjects(subjects[:2], 0.01)] == [1, 1]
    assert [len(x) for x in splits.split_subjects(subjects[:5], 1.0)] == [5, 0]
    assert [len(x) for x in splits.split_subjects(subjects[:1], 0.8)] == [1, 0]
    assert [len(x) for x in splits.split_subjects(subjects[:10])] == [8, 2]
    for bad in (0, -0.5, 1.5, float("nan"), True, "0.8"):
        with pytest.raises(ValueError, match="train_fraction"):
            splits.split_subjects(subjects, bad)


def _subjects(n):
    return [layouts.Subject(f"s{i:02d}", f"/x/{i}") for i in range(n)]


@pytest.mark.parametrize("n, fraction, held", [(2, 0.01, 1), (5, 0.2, 1), (10, 0.25, 3), (10, 0.5, 5), (9, 0.9, 8)])
def test_hold_out_is_disjoint_seeded_and_leaves_one_to_train(n, fraction, held):
    subjects = _subjects(n)
    train, val = splits.hold_out(subjects[::-1], fraction, seed=7)
    assert len(val) == held and len(train) == n - held
    assert {s.name for s in train} | {s.name for s in val} == {s.name for s in subjects}
    assert not {s.name for s in train} & {s.name for s in val}
    assert [s.name for s in val] == sorted(s.name for s in val)
    assert splits.hold_out(subjects, fraction, seed=7) == (train, val)  # same seed, same draw
    draws = {tuple(s.name for s in splits.hold_out(subjects, fraction, seed)[1]) for seed in range(20)}
    assert len(draws) > 1 or held == n - 1  # the seed chooses


def test_hold_out_refuses_to_leave_nothing_to_train():
    with pytest.raises(UserError, match=r"-validation_fraction 0.5 leaves no subject to train on: there are 1"):
        splits.hold_out(_subjects(1), 0.5, seed=0)


def test_a_new_split_holds_out_from_train_and_split_json_round_trips(tmp_path):
    subjects = _subjects(10)
    cfg = config.Settings(data_path=str(tmp_path), validation_fraction=0.25, seed=3)
    log = Log()
    split = splits.new_split(subjects, cfg, log)
    train, test = splits.split_subjects(subjects, 0.8)
    assert split.test == test and len(split.validation) == 2 and len(split.train) == 6
    assert set(split.train) | set(split.validation) == set(train)
    splits.write_split(str(tmp_path), cfg.data_path, cfg.train_fraction, split)
    saved = json.loads((tmp_path / splits.SPLIT_NAME).read_text())
    assert saved["validation"] == [s.name for s in split.validation]
    # A resume keeps the lists, whatever -seed and -validation_fraction say now.
    assert splits.saved_split(str(tmp_path), subjects, cfg.replace(seed=99, validation_fraction=0.5), log) == split
    # split.json of earlier versions has no validation list: none, and a given fraction is said unused.
    del saved["validation"]
    (tmp_path / splits.SPLIT_NAME).write_text(json.dumps(saved))
    old = splits.saved_split(str(tmp_path), subjects, cfg, log)
    assert old.validation == [] and old.train == split.train and old.test == test
    kept = splits.kept_split_settings(cfg.replace(restore=str(tmp_path)), old, log)
    assert kept.validation_fraction == 0.0
    assert "(6 train, 0 validation, 2 test subjects): -validation_fraction 0.25 is not used" in log.text
    # The default holds nothing out: the split is the original's.
    assert splits.new_split(subjects, cfg.replace(validation_fraction=0.0), log) == splits.Split(train, [], test)


def test_csv_validation_rows_are_the_validation_set():
    marks = ["train", "validation", "test", "train", "validation"]
    subjects = [layouts.Subject(f"s{i}", f"/x/{i}", split=m) for i, m in enumerate(marks)]
    log = Log()
    split = splits.new_split(subjects, config.Settings(validation_fraction=0.5), log)
    assert [[s.name for s in part] for part in (split.train, split.validation, split.test)] == [
        ["s0", "s3"], ["s1", "s4"], ["s2"]]
    assert "names the validation subjects; -validation_fraction 0.5 is not used" in log.text


@pytest.mark.parametrize("given", [{"validation_fraction": 0.5}, {"validation_fraction": 0.0},
                                   {"train_fraction": 0.6, "validation_fraction": 0.25}])
def test_a_resumed_run_keeps_the_split_settings_of_its_split_json_and_says_so(tmp_path, given):
    subjects = _subjects(10)
    cfg = config.Settings(data_path=str(tmp_path), validation_fraction=0.25, seed=3)
    split = splits.new_split(subjects, cfg, Log())
    splits.write_split(str(tmp_path), cfg.data_path, cfg.train_fraction, split)
    (tmp_path / config.CONFIG_NAME).write_text(json.dumps(config.config_record(cfg)))
    log = Log()
    resumed = cfg.replace(restore=str(tmp_path), **given)
    assert splits.saved_split(str(tmp_path), subjects, resumed, log) == split
    kept = splits.kept_split_settings(resumed, split, log)
    # What config.json will say is what runs: the run's fractions, not the flags'.
    assert (kept.train_fraction, kept.validation_fraction) == (0.8, 0.25)
    ignored = ", ".join(f"-{k} {v}" for k, v in given.items() if getattr(cfg, k) != v)
    assert f"note: the run keeps its split.json (6 train, 2 validation, 2 test subjects): {ignored} is not used" \
        in log.text
    # Flags that agree with the run say nothing.
    quiet = Log()
    assert splits.kept_split_settings(cfg.replace(restore=str(tmp_path)), split, quiet) == cfg.replace(
        restore=str(tmp_path)) and quiet.lines == []
