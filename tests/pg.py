"""A throwaway PostgreSQL server for tests (the MLflow scale-out backend).

``running_postgres()`` runs ``initdb`` into a fresh temporary directory, starts the server
with ``pg_ctl`` on 127.0.0.1 and a free port (unix socket inside the same directory, no
other listener), creates a database and yields a ``PostgresServer`` whose ``uri`` is
``postgresql+psycopg2://hescape:<random password>@127.0.0.1:<port>/<db>`` (``libpq_uri`` is
the plain ``postgresql://`` form). On exit it stops the
server (``pg_ctl stop -m fast``, then the postmaster PID if that fails) and deletes the
directory. PostgreSQL refuses to run as root, so as root every server command runs as the
``postgres`` system user via ``runuser``.

``postgres_uri`` is the pytest fixture (session scope); it skips when the binaries are
missing, with a hint that ``.ci/run`` installs them.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; "
    ".ci/run installs them (apt-get install -y postgresql)"
)
SERVICE_USER = "postgres"
DB_USER = "hescape"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started here (binaries or service user missing)."""


@dataclass
class PostgresServer:
    """A running throwaway server; ``uri`` is what MLflow / SQLAlchemy take."""

    root: Path
    port: int
    password: str
    dbname: str
    pid: int

    @property
    def uri(self) -> str:
        """SQLAlchemy URI naming the psycopg2 driver (SQLAlchemy 2.1 defaults to psycopg 3)."""
        return f"postgresql+psycopg2://{DB_USER}:{self.password}@127.0.0.1:{self.port}/{self.dbname}"

    @property
    def libpq_uri(self) -> str:
        """Plain ``postgresql://`` URI for libpq / psycopg2.connect / psql."""
        return f"postgresql://{DB_USER}:{self.password}@127.0.0.1:{self.port}/{self.dbname}"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"


def find_pg_bindir() -> Path | None:
    """The directory holding initdb/pg_ctl/postgres: PATH first, then Debian's layout."""
    names = ("initdb", "pg_ctl", "postgres")
    on_path = shutil.which("initdb")
    if on_path:
        cand = Path(on_path).resolve().parent
        if all((cand / n).exists() for n in names):
            return cand
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1,
        reverse=True,
    )
    return next((d for d in versions if all((d / n).exists() for n in names)), None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_service_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", SERVICE_USER, "--", *cmd]
    return ["su", SERVICE_USER, "-s", "/bin/sh", "-c", " ".join(map(_shell_quote, cmd))]


def _shell_quote(arg: str) -> str:
    return arg if re.fullmatch(r"[\w@%+=:,./-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


def _run(cmd: list[str], root: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    return subprocess.run(
        _as_service_user(cmd), cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )


def _make_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="hescape-pg-"))
    if os.geteuid() == 0:
        try:
            entry = pwd.getpwnam(SERVICE_USER)
        except KeyError as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise PostgresUnavailable(
                f"running as root but there is no {SERVICE_USER!r} user to run PostgreSQL as; "
                ".ci/run installs the postgresql package, which creates it"
            ) from exc
        os.chown(root, entry.pw_uid, entry.pw_gid)
    return root


def _initdb(bindir: Path, root: Path, password: str) -> None:
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        entry = pwd.getpwnam(SERVICE_USER)
        os.chown(pwfile, entry.pw_uid, entry.pw_gid)
    pwfile.chmod(0o600)
    cmd = [str(bindir / "initdb"), "-D", str(root / "data"), "-U", DB_USER,
           f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
           "-E", "UTF8", "--no-locale", "--no-sync"]  # fmt: skip
    res = _run(cmd, root)
    pwfile.unlink(missing_ok=True)
    if res.returncode != 0:
        raise RuntimeError(f"initdb failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")


def _start(bindir: Path, root: Path, port: int, max_connections: int = 60
           ) -> subprocess.CompletedProcess:
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        f"-c max_connections={int(max_connections)} -c shared_buffers=32MB"
    )
    cmd = [str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "server.log"),
           "-o", options, "-w", "-t", "60", "start"]  # fmt: skip
    return _run(cmd, root)


def _postmaster_pid(root: Path) -> int | None:
    pidfile = root / "data" / "postmaster.pid"
    try:
        return int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop(bindir: Path, root: Path, pid: int | None) -> None:
    """Stop the server: pg_ctl fast shutdown, then SIGTERM/SIGKILL the postmaster PID."""
    res = _run([str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "-w",
                "-t", "30", "stop"], root, timeout=60)  # fmt: skip
    if res.returncode == 0 or pid is None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _create_database(port: int, password: str, dbname: str) -> None:
    import psycopg2

    conn = psycopg2.connect(
        host="127.0.0.1", port=port, user=DB_USER, password=password, dbname="postgres",
        connect_timeout=10,
    )  # fmt: skip
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{dbname}"')
    finally:
        conn.close()


@contextmanager
def running_postgres(dbname: str = "mlflow", *, max_connections: int = 60
                     ) -> Iterator[PostgresServer]:
    """Start a throwaway PostgreSQL server on 127.0.0.1; stop and delete it on exit.

    ``max_connections`` is PostgreSQL's own limit (3 of them are reserved for superusers).
    """
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", dbname):
        raise ValueError(f"database name {dbname!r}: use lower-case letters, digits and _")
    bindir = find_pg_bindir()
    if bindir is None:
        raise PostgresUnavailable(INSTALL_HINT)
    root = _make_root()
    password = secrets.token_urlsafe(16)
    started = False
    try:
        _initdb(bindir, root, password)
        for _attempt in range(3):  # a free port can be taken between probe and bind
            port = _free_port()
            res = _start(bindir, root, port, max_connections)
            started = res.returncode == 0
            if started:
                break
        if not started:
            log = (root / "server.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"pg_ctl start failed:\n{res.stdout}\n{res.stderr}\n{log}")
        _create_database(port, password, dbname)
        pid = _postmaster_pid(root)
        yield PostgresServer(root=root, port=port, password=password, dbname=dbname, pid=pid or -1)
    finally:
        if started:
            _stop(bindir, root, _postmaster_pid(root))
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Session-wide throwaway PostgreSQL server (skips if PostgreSQL is not installed)."""
    try:
        with running_postgres() as server:
            yield server
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def postgres_uri(postgres_server: PostgresServer) -> str:
    """``postgresql+psycopg2://hescape:<password>@127.0.0.1:<port>/mlflow`` (throwaway server)."""
    return postgres_server.uri
