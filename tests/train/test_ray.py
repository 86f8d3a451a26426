"""A real 2-worker Ray Train run (TorchTrainer, gloo on CPU) of a tiny config."""

import pytest


@pytest.fixture
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_two_worker_torch_trainer_reports_metrics(make_cfg, tmp_path, ray_cluster):
    cfg = make_cfg(max_steps=6, eval_every=3, batch_size=16, num_workers=2, in_process=False)
    from hescape.train import fit, runs_in_process

    assert not runs_in_process(cfg)
    seen = []
    result = fit(cfg, run_dir=tmp_path / "ray_run", verbose=False,
                 report_callback=lambda m, c: seen.append((m["step"], c)))
    assert [s for s, _ in seen] == [3, 6]
    assert all(c is not None and (c / "model.pt").is_file() for _, c in seen)
    assert result.best_checkpoint is not None and result.best_checkpoint.parent == tmp_path / "ray_run"
    for key in ("train/loss", "val/loss", "val/r5_img2gene", "val/donor_chance"):
        assert key in result.metrics
    assert result.metrics["step"] == 6

    from hescape.train.checkpoint import load_model

    model, loaded, meta = load_model(result.best_checkpoint)
    assert loaded.train.num_workers == 2 and meta["step"] in (3, 6)
