"""MLflow lineage on a real sqlite store: what the MLflow UI shows (kind, source, datasets)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from hescape.study import lineage
from hescape.tracking import resolve_artifact_location, resolve_tracking_uri

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, str]:
    """One sqlite store under ``<tmp>/runs`` (its schema set-up takes seconds) for the module;
    the process works from an empty other directory, which must stay empty."""
    tmp = tmp_path_factory.mktemp("lineage")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("HESCAPE_ARTIFACT_LOCATION", raising=False)
        (tmp / "elsewhere").mkdir()
        mp.chdir(tmp / "elsewhere")
        yield tmp / "runs", resolve_tracking_uri(None, tmp / "runs")
        assert list((tmp / "elsewhere").iterdir()) == []  # nothing landed in ./mlruns


def _open(storage: Path, uri: str, name: str = "s1"):
    loc = resolve_artifact_location(None, storage, uri, name)
    return lineage.open_parent(uri, name, name, resume=False, tags={}, artifact_location=loc)


def test_experiment_is_training_kind_and_artifacts_stay_in_storage(store) -> None:
    storage, uri = store
    ref = _open(storage, uri)
    client = MlflowClient(uri)
    exp = client.get_experiment(ref.experiment_id)
    assert exp.tags[lineage.TAG_EXPERIMENT_KIND] == "custom_model_development"
    child = lineage.open_child(ref, "t1", existing=None, name="t1", tags={})
    client.log_text(child, "x", "eval/note.txt")
    client.log_text(ref.parent_run_id, "<html></html>", "report/report.html")
    base = storage / "mlartifacts" / "s1"
    assert (base / child / "artifacts/eval/note.txt").read_text() == "x"
    assert (base / ref.parent_run_id / "artifacts/report/report.html").is_file()
    assert not (Path.cwd() / "mlruns").exists()  # MLflow's default: ./mlruns of the cwd


def test_existing_experiment_gets_kind_tag_but_a_chosen_kind_is_kept(store) -> None:
    storage, uri = store
    client = MlflowClient(uri)
    old = client.create_experiment("old", artifact_location=(storage / "legacy").as_uri())
    lineage.get_or_create_experiment(client, "old", artifact_location="file:///elsewhere")
    exp = client.get_experiment(old)
    assert exp.tags[lineage.TAG_EXPERIMENT_KIND] == "custom_model_development"
    assert exp.artifact_location == (storage / "legacy").as_uri()  # MLflow cannot move it
    chosen = client.create_experiment("chosen", tags={lineage.TAG_EXPERIMENT_KIND: "finetuning"})
    lineage.get_or_create_experiment(client, "chosen")
    assert client.get_experiment(chosen).tags[lineage.TAG_EXPERIMENT_KIND] == "finetuning"


def test_entry_point_names_the_command_without_options_or_secrets() -> None:
    assert lineage.entry_point(["study/run.py", "experiments/demo.yaml", "--set", "a=1"]) == (
        "study/run.py experiments/demo.yaml")
    assert lineage.entry_point(["/x/.venv/bin/hescape", "study", "run", "c.yaml", "d", "e"]) == (
        "hescape study run c.yaml")
    assert "hunter2" not in lineage.entry_point(["run.py", "postgresql://u:hunter2@h/db"])


def test_source_tags_on_parent_and_children(store, monkeypatch) -> None:
    storage, uri = store
    monkeypatch.setattr(sys, "argv", [str(ROOT / "study" / "run.py"), "experiments/tiny.yaml"])
    ref = _open(storage, uri, "s2")
    child = lineage.open_child(ref, "t1", existing=None, name="t1", tags={"hescape.seed": "0"})
    client = MlflowClient(uri)
    for run_id in (ref.parent_run_id, child):
        tags = client.get_run(run_id).data.tags
        assert tags["mlflow.source.name"].endswith("study/run.py")
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.project.entryPoint"].endswith("run.py experiments/tiny.yaml")
        if (ROOT / ".git").exists():
            assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
    assert client.get_run(child).data.tags["hescape.seed"] == "0"


def test_dataset_inputs_on_parent_and_children_filterable(store, tmp_path) -> None:
    from hescape.data import load_paired, tiny_dataset

    storage, uri = store
    paired = load_paired(tiny_dataset(tmp_path / "panel", seed=0))
    ref = _open(storage, uri, "s3")
    lineage.log_dataset(ref, ref.parent_run_id, paired)
    lineage.log_dataset(ref, ref.parent_run_id, paired)  # a resumed driver logs it again
    child = lineage.open_child(ref, "t1", existing=None, name="t1", tags={})
    client = MlflowClient(uri)
    for run_id in (ref.parent_run_id, child):
        inputs = client.get_run(run_id).inputs.dataset_inputs
        by_part = {i.tags[0].value: i.dataset for i in inputs}
        assert sorted(by_part) == sorted(paired.split) and len(inputs) == len(paired.split)
        for part, ds in by_part.items():
            profile = json.loads(ds.profile)
            assert ds.name == "panel" and re.fullmatch(r"[0-9a-f]{12}", ds.digest)
            assert profile["fingerprint"] == paired.fingerprint
            assert profile["donors"] == sorted(paired.split[part])
            assert profile["n_spots"] == len(paired.indices(part))
            assert json.loads(ds.source)["uri"] == str(paired.path.resolve())
    assert len({ds.digest for ds in by_part.values()}) == len(by_part)
    found = client.search_runs([ref.experiment_id],
                               "dataset.name = 'panel' and dataset.context = 'test'")
    assert {r.info.run_id for r in found} == {ref.parent_run_id, child}


def test_reattached_child_is_not_duplicated(store) -> None:
    storage, uri = store
    ref = _open(storage, uri, "s4")
    first = lineage.open_child(ref, "t1", existing=None, name="t1", tags={})
    again = lineage.open_child(ref, "t1", existing=lineage.find_child(ref, "t1"), name="t1",
                               tags={})
    assert again == first and len(lineage.child_runs(ref)) == 1


def test_dashboard_hint_links_the_training_view_of_the_experiment(store) -> None:
    storage, uri = store
    ref = _open(storage, uri, "s5")
    hint = lineage.dashboard_hint(uri, ref.parent_run_id)
    assert f"make mlflow-ui MLFLOW_STORAGE={storage.resolve()} " in hint
    assert hint.endswith(f"/#/experiments/{ref.experiment_id}?workflowType=machine_learning")
    assert "mlflow ui" not in hint  # plain `mlflow ui` leaves job consumers behind


def test_unusable_artifact_store_is_refused_with_the_key(tmp_path, monkeypatch) -> None:
    from importlib.util import find_spec

    from hescape.config import ConfigError, StudyConfig

    monkeypatch.delenv("HESCAPE_ARTIFACT_LOCATION", raising=False)
    uri = "sqlite:///x/mlflow.db"

    def cfg(location):
        return StudyConfig.model_validate({"storage_dir": str(tmp_path), "name": "s",
                                           "mlflow": {"artifact_location": location}})

    assert lineage.artifact_location_for(cfg(None), uri) == (tmp_path / "mlartifacts/s").as_uri()
    with pytest.raises(ConfigError, match="mlflow.artifact_location.*foo://bucket/s"):
        lineage.artifact_location_for(cfg("foo://bucket"), uri)
    if find_spec("boto3") is None:
        with pytest.raises(ConfigError, match="boto3"):
            lineage.artifact_location_for(cfg("s3://bucket/prefix"), uri)
