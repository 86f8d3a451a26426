"""Donor-level splits: never a donor in two parts, file splits, leave-one-donor-out."""

from __future__ import annotations

import pytest

from hescape.config import SplitConfig
from hescape.data import DataError, leave_one_donor_out, make_split


@pytest.mark.parametrize("n_donors", [2, 3, 4, 6, 11, 25])
def test_no_donor_in_two_parts_over_many_seeds(n_donors):
    counts = {f"d{i}": 50 for i in range(n_donors)}
    for seed in range(60):
        for val, test in [(0.0, 0.3), (0.17, 0.33), (0.3, 0.3), (0.45, 0.5)]:
            split = make_split(counts, SplitConfig(val_fraction=val, test_fraction=test,
                                                   seed=seed))
            members = [d for part in split.values() for d in part]
            assert len(members) == len(set(members)) == n_donors
            assert split["train"] and split["test"]


def test_seed_is_deterministic_and_matters():
    counts = {f"d{i}": 50 for i in range(12)}
    a = make_split(counts, SplitConfig(seed=1))
    assert a == make_split(counts, SplitConfig(seed=1))
    assert any(make_split(counts, SplitConfig(seed=s)) != a for s in range(2, 6))


def test_split_file_csv_and_yaml(tmp_path):
    counts = {"a": 20, "b": 20, "c": 20}
    csv = tmp_path / "split.csv"
    csv.write_text("donor,split\na,train\nb,valid\nc,test\n")
    assert make_split(counts, SplitConfig(file=str(csv))) == {
        "train": ["a"], "val": ["b"], "test": ["c"]}
    yml = tmp_path / "split.yaml"
    yml.write_text("train: [a, b]\ntest: [c]\n")
    assert make_split(counts, SplitConfig(file=str(yml)))["train"] == ["a", "b"]


@pytest.mark.parametrize("rows,match", [
    ("a,train\nb,test\nzz,test\n", r"unknown|not in the data.*'zz'"),
    ("a,train\nb,test\na,test\n", r"donor 'a' is in both 'train' and 'test'"),
    ("a,train\nb,test\n", r"\['c'\] are in no part"),
    ("a,train\nb,holdout\nc,test\n", r"row 2.*'holdout'"),
])
def test_split_file_errors(tmp_path, rows, match):
    path = tmp_path / "split.csv"
    path.write_text("donor,split\n" + rows)
    with pytest.raises(DataError, match=match) as err:
        make_split({"a": 20, "b": 20, "c": 20}, SplitConfig(file=str(path)))
    assert "split.csv" in str(err.value)


def test_too_few_spots_names_donor():
    with pytest.raises(DataError, match=r"too few spots.*'b': 3.*min_spots_per_donor"):
        make_split({"a": 40, "b": 3, "c": 30}, SplitConfig())


def test_leave_one_donor_out():
    folds = list(leave_one_donor_out(["b", "a", "c", "a"]))
    assert [held for _, held in folds] == ["a", "b", "c"]
    for train, held in folds:
        assert held not in train and len(train) == 2
    with pytest.raises(DataError):
        list(leave_one_donor_out(["a"]))
