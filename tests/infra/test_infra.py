"""Every file under infra/: parses, names entry points that exist, binds 127.0.0.1 unless the
user opts in, declares GPUs; the SLURM recipe runs against stub srun/ray; the MLflow recipe
serves a real run against a throwaway PostgreSQL server."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
sys.path.insert(0, str(ROOT / "tests"))
from pg import PostgresServer, postgres_server  # noqa: E402,F401 - fixture

SHELL_SCRIPTS = [INFRA / "slurm" / "study.sbatch", INFRA / "mlflow" / "serve.sh"]
YAML_FILES = [
    INFRA / "runtime_env.yaml",
    INFRA / "ray" / "cluster.yaml",
    INFRA / "kuberay" / "rayjob.yaml",
]
ALL_FILES = sorted(p for p in INFRA.rglob("*") if p.is_file())
DOCS = [ROOT / "docs" / "cluster.md", ROOT / "docs" / "security.md"]


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- generic checks


def test_expected_files_exist() -> None:
    for path in [*SHELL_SCRIPTS, *YAML_FILES, INFRA / "mlflow" / "README.md",
                 INFRA / "docker" / "Dockerfile", *DOCS]:  # fmt: skip
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_parses(path: Path) -> None:
    docs = _load_all(path)
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax_and_executable(path: Path) -> None:
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert os.access(path, os.X_OK), f"{path} is not executable"
    assert path.read_text().startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in path.read_text()


def _code_lines(path: Path) -> list[str]:
    comment = "#" if path.suffix in (".sh", ".sbatch", ".yaml", "") else None
    lines = path.read_text().splitlines()
    if comment is None:
        return lines
    return [ln for ln in lines if not ln.lstrip().startswith(comment)]


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_no_wildcard_bind_without_opt_in(path: Path) -> None:
    """0.0.0.0 / :: appear only in comments; every --host/--dashboard-host defaults to 127.0.0.1."""
    text = path.read_text()
    for line in _code_lines(path):
        assert "0.0.0.0" not in line, f"{path.name}: binds all interfaces: {line.strip()}"
    for flag, value in re.findall(r"(--dashboard-host|--host)[= ]+(\S+)", "\n".join(_code_lines(path))):
        value = value.strip("\"'\\")
        if value == "127.0.0.1":
            continue
        var = re.fullmatch(r"\$\{?(\w+)\}?", value)
        assert var, f"{path.name}: {flag} {value}: use 127.0.0.1 or an opt-in variable"
        assert re.search(rf"{var[1]}=\$\{{HESCAPE_BIND_HOST:-127\.0\.0\.1\}}", text), (
            f"{path.name}: {flag} ${var[1]} must default to 127.0.0.1 via HESCAPE_BIND_HOST"
        )


@pytest.mark.parametrize("path", ALL_FILES + DOCS, ids=lambda p: p.name)
def test_named_entry_points_exist(path: Path) -> None:
    text = path.read_text()
    named = set(re.findall(r"\b(?:study/run\.py|experiments/[\w\-]+\.yaml)", text))
    for rel in sorted(named):
        assert (ROOT / rel).is_file(), f"{path.name} names {rel}, which does not exist"


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.name)
def test_exposure_is_explained(path: Path) -> None:
    """Each server recipe says what exposing it means."""
    if path.name not in {"cluster.yaml", "rayjob.yaml", "study.sbatch", "serve.sh"}:
        pytest.skip("not a server recipe")
    text = path.read_text().lower()
    assert "security" in text and "authentication" in text
    assert "arbitrary" in text or "no authentication" in text


# --------------------------------------------------------------------------- per file


def test_runtime_env_is_valid_for_ray() -> None:
    from ray.runtime_env import RuntimeEnv

    cfg = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    RuntimeEnv(**cfg)  # raises on unknown or malformed fields
    assert cfg["working_dir"] == "."
    for excluded in ("runs/", ".venv/", ".git/"):
        assert excluded in cfg["excludes"]
    assert cfg["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert all(isinstance(v, str) for v in cfg["env_vars"].values())
    assert not any(re.search(r"password|secret|token|key", k, re.I) for k in cfg["env_vars"])


def test_cluster_launcher_config() -> None:
    from ray.autoscaler._private.util import validate_config

    cfg = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    validate_config({**cfg, "cluster_synced_files": []})  # Ray's JSON schema + node-type checks
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    setup = "\n".join(cfg["setup_commands"])
    assert "pip install" in setup and "-c constraints.txt -e ." in setup
    assert (ROOT / "constraints.txt").is_file() and (ROOT / "pyproject.toml").is_file()
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])


def test_kuberay_rayjob() -> None:
    docs = _load_all(INFRA / "kuberay" / "rayjob.yaml")
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    entry = spec["entrypoint"].split()
    assert entry[:3] == ["python", "study/run.py", "experiments/batch_correction_ablation.yaml"]
    assert (ROOT / entry[1]).is_file() and (ROOT / entry[2]).is_file()
    yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert cluster["authOptions"]["mode"] == "token"
    groups = cluster["workerGroupSpecs"]
    gpu_limits = [
        c["resources"]["limits"].get("nvidia.com/gpu")
        for g in groups
        for c in g["template"]["spec"]["containers"]
    ]
    assert any(v and int(v) >= 1 for v in gpu_limits), "no GPU worker group"
    head_c = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_c["resources"].get("limits", {})
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == (
        groups[0]["template"]["metadata"]["labels"]
    )
    assert all(svc not in (INFRA / "kuberay" / "rayjob.yaml").read_text().split("#")[0]
               for svc in ("LoadBalancer", "NodePort"))  # fmt: skip


def test_dockerfile_copies_existing_paths() -> None:
    text = (INFRA / "docker" / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -c constraints.txt -e ." in text
    for line in text.splitlines():
        if line.startswith("COPY"):
            for src in [t for t in line.split()[1:-1] if not t.startswith("--")]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    ray_pin = re.search(r"^ray==([\d.]+)", (ROOT / "constraints.txt").read_text(), re.M)
    if ray_pin:
        assert f"rayproject/ray:{ray_pin[1]}-" in text, "base image must match the pinned Ray"


# --------------------------------------------------------------------------- SLURM (stubbed)

_STUBS = {
    "scontrol": 'echo "$SLURM_JOB_NODELIST" | tr "," "\\n"\n',
    "hostname": "echo 10.1.2.3\n",
    "srun": (
        'node=""\n'
        'while [[ $# -gt 0 && $1 == -* ]]; do\n'
        '  if [[ $1 == -w ]]; then node=$2; shift 2; else shift; fi\n'
        "done\n"
        'echo "srun $node: $*" >> "$STUB_LOG"\n'
        'exec "$@"\n'
    ),
    "ray": (
        'echo "ray $*" >> "$STUB_LOG"\n'
        'if [[ " $* " == *" --block "* ]]; then exec sleep 30; fi\n'
    ),
    "python": (
        'case "$1" in\n'
        '  -c) exec "$REAL_PYTHON" "$@" ;;\n'
        '  -) cat > /dev/null; grep -c "^ray start" "$STUB_LOG" ;;\n'
        '  *) echo "driver $* auth=$RAY_AUTH_MODE token_len=${#RAY_AUTH_TOKEN}" >> "$STUB_LOG" ;;\n'
        "esac\n"
    ),
}


def _run_sbatch(tmp_path: Path, extra_env: dict[str, str], *args: str):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in _STUBS.items():
        p = stubs / name
        p.write_text("#!/usr/bin/env bash\n" + body)
        p.chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    env = {
        **os.environ,
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "STUB_LOG": str(log),
        "REAL_PYTHON": sys.executable,
        "PYTHON": str(stubs / "python"),
        "HESCAPE_VENV": str(tmp_path / "no-venv"),
        "SLURM_SUBMIT_DIR": str(ROOT),
        "SLURM_JOB_NODELIST": "gpu01,gpu02,gpu03",
        "SLURM_CPUS_PER_TASK": "16",
        "SLURM_GPUS_ON_NODE": "4",
        "POLL_S": "0.1",
        "STARTUP_TIMEOUT_S": "30",
        **extra_env,
    }
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("HESCAPE_BIND_HOST", None) if "HESCAPE_BIND_HOST" not in extra_env else None
    res = subprocess.run(["bash", str(INFRA / "slurm" / "study.sbatch"), *args], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    return res, log.read_text().splitlines()


def test_sbatch_starts_head_workers_and_study(tmp_path: Path) -> None:
    res, calls = _run_sbatch(tmp_path, {}, "--resume")
    assert res.returncode == 0, res.stderr + "\n".join(calls)
    heads = [c for c in calls if c.startswith("ray start --head")]
    workers = [c for c in calls if c.startswith("ray start") and "--head" not in c]
    assert len(heads) == 1 and len(workers) == 2
    assert "--dashboard-host=127.0.0.1" in heads[0] and "--num-gpus=4" in heads[0]
    assert all("--address=10.1.2.3:6379" in w and "--num-gpus=4" in w for w in workers)
    assert {c.split(":")[0] for c in calls if c.startswith("srun") and "ray start" in c} == {
        "srun gpu01", "srun gpu02", "srun gpu03"}  # fmt: skip
    driver = [c for c in calls if c.startswith("driver")]
    assert driver == [
        "driver study/run.py experiments/batch_correction_ablation.yaml "
        "--address 10.1.2.3:6379 --resume auth=token token_len=64"
    ]
    # the head started before any worker, the study after all of them
    assert calls.index(heads[0]) < min(calls.index(w) for w in workers)
    assert calls.index(driver[0]) > max(calls.index(w) for w in workers)
    assert "warning" not in res.stderr


def test_sbatch_bind_opt_in_warns(tmp_path: Path) -> None:
    res, calls = _run_sbatch(tmp_path, {"HESCAPE_BIND_HOST": "0.0.0.0",
                                        "STUDY": "experiments/demo.yaml"})  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "--dashboard-host=0.0.0.0" in next(c for c in calls if "--head" in c)
    assert "warning" in res.stderr and "remote code" in res.stderr
    assert any("experiments/demo.yaml" in c for c in calls if c.startswith("driver"))


# --------------------------------------------------------------------------- MLflow recipe


def _listen_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp{,6})."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            addr, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A = LISTEN
                continue
            if len(addr) == 8:  # IPv4, little-endian
                found.add(".".join(str(int(addr[i : i + 2], 16)) for i in (6, 4, 2, 0)))
            else:
                found.add("::" if set(addr) == {"0"} else addr)
    return found


def _serve(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HESCAPE_BIND_HOST"}
    return subprocess.run(["bash", str(INFRA / "mlflow" / "serve.sh")], capture_output=True,
                          text=True, env={**env, "HESCAPE_DRY_RUN": "1", **env_extra})  # fmt: skip


def test_mlflow_serve_defaults_to_localhost() -> None:
    res = _serve({})
    assert res.returncode == 0, res.stderr
    cmd = res.stdout.split()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--backend-store-uri") + 1].startswith("postgresql+psycopg2://")
    assert "--serve-artifacts" in cmd and res.stderr == ""


def test_mlflow_serve_opt_in_and_password_warnings() -> None:
    res = _serve({"HESCAPE_BIND_HOST": "0.0.0.0",
                  "MLFLOW_BACKEND_STORE_URI": "postgresql://u:pw@db:5432/mlflow",
                  "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/prefix"})  # fmt: skip
    assert res.returncode == 0, res.stderr
    cmd = res.stdout.split()
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://bucket/prefix"
    assert "without authentication" in res.stderr and "pgpass" in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlflow_serve_real_server_on_postgres(tmp_path: Path, postgres_server: PostgresServer) -> None:  # noqa: F811
    """serve.sh against a real PostgreSQL (password from a pgpass file, not the URI)."""
    from mlflow.tracking import MlflowClient

    from hescape.tracking import log_metrics_retry

    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{postgres_server.port}:{postgres_server.dbname}:hescape:"
                      f"{postgres_server.password}\n")  # fmt: skip
    pgpass.chmod(0o600)
    port = _free_port()
    backend = f"postgresql://hescape@127.0.0.1:{postgres_server.port}/{postgres_server.dbname}"
    env = {k: v for k, v in os.environ.items() if k not in ("HESCAPE_BIND_HOST", "MLFLOW_TRACKING_URI")}
    env.update(PGPASSFILE=str(pgpass), MLFLOW_BACKEND_STORE_URI=backend, MLFLOW_PORT=str(port),
               MLFLOW_ARTIFACTS_DESTINATION=f"file://{tmp_path}/artifacts", MLFLOW_WORKERS="1",
               MLFLOW=str(Path(sys.executable).parent / "mlflow"))  # fmt: skip
    log = (tmp_path / "server.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(["bash", str(INFRA / "mlflow" / "serve.sh")], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:  # noqa: S310
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        startup_s = time.perf_counter() - t0
        assert _listen_addresses(port) == {"127.0.0.1"}

        client = MlflowClient(tracking_uri=url)
        exp = client.create_experiment("infra-serve")
        run = client.create_run(exp)
        for step in range(5):
            log_metrics_retry(client, run.info.run_id, {"val/R@5": step / 5}, step=step)
        client.log_text(run.info.run_id, "hello", "report/hello.txt")
        client.set_terminated(run.info.run_id)
        assert len(client.get_metric_history(run.info.run_id, "val/r5")) == 5
        stored = list((tmp_path / "artifacts").rglob("hello.txt"))
        assert stored and stored[0].read_text() == "hello"
        print(f"mlflow serve.sh on PostgreSQL: up in {startup_s:.1f}s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
