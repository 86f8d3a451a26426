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


def test_donor_folds_make_every_donor_a_test_donor_once():
    from hescape.data.splits import donor_folds

    donors = [f"d{i}" for i in range(10)]
    labels = {d: ("mut" if i < 4 else "wt") for i, d in enumerate(donors)}
    folds = donor_folds(donors, 4, seed=1, labels=labels)
    assert len(folds) == 4
    tests = [d for f in folds for d in f["test"]]
    assert sorted(tests) == sorted(donors)  # each donor a test donor exactly once
    for i, f in enumerate(folds):
        assert set(f["train"]) | set(f["val"]) | set(f["test"]) == set(donors)
        assert not set(f["train"]) & set(f["val"]) and not set(f["val"]) & set(f["test"])
        assert f["val"] == folds[(i + 1) % 4]["test"]  # validation = the next fold's test
        assert {labels[d] for d in f["test"]} == {"mut", "wt"}  # stratified where possible
    assert donor_folds(donors, 4, seed=1, labels=labels) == folds  # seeded
    assert donor_folds(donors, 4, seed=2, labels=labels) != folds


def test_donor_folds_refuse_too_few_donors_or_folds():
    from hescape.data.splits import donor_folds

    with pytest.raises(DataError, match="k >= 3"):
        donor_folds(["a", "b", "c"], 2)
    with pytest.raises(DataError, match="fewer than the folds"):
        donor_folds(["a", "b", "c"], 4)


def test_with_fold_replaces_the_split_of_a_dataset(tmp_path):
    from hescape.config import StudyConfig
    from hescape.data import load_paired, tiny_dataset
    from hescape.data.splits import with_fold

    paired = load_paired(tiny_dataset(tmp_path / "d", seed=0, n_donors=5))
    cfg = StudyConfig.model_validate({"data": {"path": str(paired.path), "fold": 2},
                                      "eval": {"donor_folds": 5}})
    folded = with_fold(paired, cfg)
    assert folded.fingerprint == paired.fingerprint and folded.split != paired.split
    assert len(folded.split["test"]) == 1 and len(folded.split["train"]) == 3
    assert set(folded.adata.obs["donor"].astype(str)[folded.indices("test")]) == \
        set(folded.split["test"])
    none = StudyConfig.model_validate({"data": {"path": str(paired.path)}})
    assert with_fold(paired, none) is paired
