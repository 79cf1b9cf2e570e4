"""Real servers for integration tests: PostgreSQL, an S3 endpoint (moto), MLflow and Prefect.

Each context manager starts one server as a subprocess on a free 127.0.0.1 port,
waits (bounded) until it answers, and on exit stops it and removes its temporary
folder. Every server writes stdout and stderr to a log file in that folder; a
server that does not come up raises ServerStartError with the log's tail.

    with postgres(["mlflow"]) as pg, moto_s3() as s3:
        s3.make_bucket("mlops")
        backend = pg.url("mlflow")
        with mlflow_server(backend, "s3://mlops/mlflow-artifacts", s3.endpoint, s3.env()) as m:
            ...  # MLFLOW_TRACKING_URI=m.uri
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
VENV_BIN = Path(sys.executable).parent  # not resolved: a venv's python is a symlink out of the venv

# Requests to 127.0.0.1 must never go through an HTTP(S)_PROXY from the environment.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerStartError(RuntimeError):
    """A test server could not be found, did not start, or did not answer in time."""


@dataclass
class ServerProcess:
    """One started server process (in its own process group) and its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM

    def tail(self, lines: int = 40) -> str:
        """The last lines of the server's log."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"

    def failure(self, reason: str) -> ServerStartError:
        """An error naming the server, the reason and the log tail."""
        return ServerStartError(f"{self.name}: {reason}\n--- {self.log} (tail) ---\n{self.tail()}")

    def wait_until(self, answers: Callable[[], bool], timeout: float) -> None:
        """Poll `answers` until it is true; fail when the process exits or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while not answers():
            if self.popen.poll() is not None:
                raise self.failure(f"exited with code {self.popen.returncode} before answering")
            if time.monotonic() > deadline:
                raise self.failure(f"did not answer within {timeout:.0f} s")
            time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        """Signal the whole process group, wait `grace` seconds, then kill what is left. Idempotent."""
        if self.popen.poll() is None:
            _signal_group(self.popen.pid, self.stop_signal)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.popen.pid, signal.SIGKILL)
                self.popen.wait(grace)
        # Workers (uvicorn, gunicorn, postgres backends) may outlive their leader.
        _signal_group(self.popen.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status `url` answers with, or None when nothing answers."""
    try:
        with _direct.open(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (OSError, ValueError):
        return None


def venv_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus `extra`, with the venv's bin first on PATH."""
    env = {**os.environ, **(extra or {})}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', os.defpath)}"
    return env


def start_process(
    name: str,
    args: list[str],
    workdir: Path,
    env: Mapping[str, str],
    cwd: Path | None = None,
    user: str | None = None,
) -> ServerProcess:
    """Start `args` in a new session (process group), stdout and stderr to <workdir>/<name>.log."""
    log = workdir / f"{name}.log"
    with log.open("ab") as sink:
        popen = subprocess.Popen(
            args,
            cwd=cwd or workdir,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
            group=pwd.getpwnam(user).pw_gid if user else None,
        )
    return ServerProcess(name, popen, log)


@contextlib.contextmanager
def scratch_dir(prefix: str, owner: str | None = None) -> Iterator[Path]:
    """A temporary folder under /tmp (reachable by other users when `owner` is set), removed on exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        if owner:
            entry = pwd.getpwnam(owner)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def running(process: ServerProcess) -> Iterator[ServerProcess]:
    """Stop `process` on exit, however the block ends."""
    try:
        yield process
    finally:
        process.stop()


# PostgreSQL ------------------------------------------------------------------------------------


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster: superuser `postgres`, trust auth on 127.0.0.1 only."""

    port: int
    workdir: Path
    process: ServerProcess = field(repr=False)
    host: str = HOST
    user: str = "postgres"

    def url(self, db: str, driver: str = "postgresql") -> str:
        """URL of database `db`: plain for libpq (psycopg2.connect), or with a SQLAlchemy driver.

        The plain URL is what MLflow gets (psycopg2 under the pinned SQLAlchemy 2.0);
        Prefect needs driver="postgresql+asyncpg".
        """
        return f"{driver}://{self.user}@{self.host}:{self.port}/{db}"


def postgres_bindir() -> Path:
    """The folder holding initdb and postgres: the newest /usr/lib/postgresql/*/bin, else pg_config's."""

    def version(path: str) -> float:
        with contextlib.suppress(ValueError):
            return float(Path(path).parent.name)
        return 0.0

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    if shutil.which("pg_config"):
        bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
        candidates.append(bindir)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file() and (Path(candidate) / "postgres").is_file():
            return Path(candidate)
    raise ServerStartError(
        "PostgreSQL server binaries (initdb, postgres) not found under /usr/lib/postgresql/*/bin "
        "or `pg_config --bindir`; run infra/scripts/install-postgres.sh"
    )


def _postgres_answers(port: int) -> bool:
    import psycopg2

    try:
        psycopg2.connect(host=HOST, port=port, user="postgres", dbname="postgres", connect_timeout=2).close()
    except psycopg2.OperationalError:
        return False
    return True


def _create_databases(port: int, databases: list[str]) -> None:
    import psycopg2
    from psycopg2 import sql

    connection = psycopg2.connect(host=HOST, port=port, user="postgres", dbname="postgres")
    connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with connection.cursor() as cursor:
            for name in databases:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        connection.close()


def _initdb(bindir: Path, workdir: Path, data: Path, user: str | None) -> None:
    args = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]
    args += ["-E", "UTF8", "--locale=C", "--no-sync"]
    init = start_process("initdb", args, workdir, venv_env({"HOME": str(workdir)}), user=user)
    if init.popen.wait(120) != 0:
        raise init.failure(f"initdb failed with code {init.popen.returncode}")
    # Only the temp folder's socket and 127.0.0.1, both trusted: no other way in.
    (data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")


@contextlib.contextmanager
def postgres(databases: list[str], timeout: float = 60.0) -> Iterator[PostgresServer]:
    """Start a PostgreSQL cluster with `databases` created; stop it and delete it on exit.

    Args:
        databases: names of the empty databases to create.
        timeout: seconds to wait for the server to accept connections.

    Returns:
        The running server (yielded).
    """
    bindir = postgres_bindir()
    # initdb refuses to run as root; run the cluster as the `postgres` system user then.
    user = "postgres" if os.geteuid() == 0 else None
    with scratch_dir("pg-test-", owner=user) as workdir:
        data = workdir / "data"
        _initdb(bindir, workdir, data, user)
        port = free_port()
        speed = ["fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=200"]
        args = [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-c", f"listen_addresses={HOST}"]
        args += ["-c", f"unix_socket_directories={workdir}"]
        args += [item for setting in speed for item in ("-c", setting)]
        process = start_process("postgres", args, workdir, venv_env({"HOME": str(workdir)}), user=user)
        process.stop_signal = signal.SIGINT  # "fast" shutdown; SIGTERM would wait for every client
        with running(process):
            process.wait_until(lambda: _postgres_answers(port), timeout)
            _create_databases(port, databases)
            yield PostgresServer(port=port, workdir=workdir, process=process)


# S3 (moto) -------------------------------------------------------------------------------------


@dataclass
class S3Server:
    """moto's S3 over HTTP; any credentials are accepted."""

    endpoint: str
    process: ServerProcess = field(repr=False)
    access_key: str = "testing"
    secret_key: str = "testing"
    region: str = "us-east-1"

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint with dummy credentials and path-style addressing."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}),
        )

    def env(self) -> dict[str, str]:
        """Environment variables that point AWS SDKs (boto3, s3fs, DVC) at this endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def make_bucket(self, name: str) -> None:
        """Create bucket `name`."""
        self.client().create_bucket(Bucket=name)


@contextlib.contextmanager
def moto_s3(timeout: float = 60.0) -> Iterator[S3Server]:
    """Start `python -m moto.server` on a free port; stop it on exit (its buckets live in memory)."""
    with scratch_dir("moto-test-") as workdir:
        port = free_port()
        args = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
        endpoint = f"http://{HOST}:{port}"
        with running(start_process("moto", args, workdir, venv_env())) as process:
            process.wait_until(lambda: http_status(endpoint) is not None, timeout)
            yield S3Server(endpoint=endpoint, process=process)


# MLflow ----------------------------------------------------------------------------------------


@dataclass
class MlflowServer:
    """The project's MLflow tracking server (mlflow/start-server.sh)."""

    uri: str
    process: ServerProcess = field(repr=False)

    def stop(self) -> None:
        """Stop the server (and its workers) now; the context's exit then does nothing more."""
        self.process.stop()


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str,
    artifacts_destination: str,
    s3_endpoint: str | None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> Iterator[MlflowServer]:
    """Run mlflow/start-server.sh with one worker on a free port until GET /health is 200.

    Args:
        backend_store_uri: e.g. PostgresServer.url("mlflow").
        artifacts_destination: e.g. "s3://mlops/mlflow-artifacts".
        s3_endpoint: MLFLOW_S3_ENDPOINT_URL, or None for AWS itself.
        env: extra environment for the server, e.g. S3Server.env() (its S3 credentials).
        timeout: seconds to wait; the first start on an empty database creates the schema.

    Returns:
        The running server (yielded).
    """
    port = free_port()
    settings = {
        "MLFLOW_BACKEND_STORE_URI": backend_store_uri,
        "MLFLOW_ARTIFACTS_DESTINATION": artifacts_destination,
        "MLFLOW_HOST": HOST,
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
    }
    if s3_endpoint:
        settings["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
    uri = f"http://{HOST}:{port}"
    script = REPO_ROOT / "mlflow" / "start-server.sh"
    with scratch_dir("mlflow-test-") as workdir:
        process = start_process(
            "mlflow", ["bash", str(script)], workdir, venv_env({**(env or {}), **settings})
        )
        with running(process):
            process.wait_until(lambda: http_status(f"{uri}/health") == 200, timeout)
            yield MlflowServer(uri=uri, process=process)


# Prefect ---------------------------------------------------------------------------------------


@dataclass
class PrefectServer:
    """The project's Prefect server on PostgreSQL (infra/prefect/start-server.sh)."""

    api_url: str
    process: ServerProcess = field(repr=False)

    def stop(self) -> None:
        """Stop the server now; the context's exit then does nothing more."""
        self.process.stop()


@dataclass
class PrefectWorker:
    """A worker started by a project's infra/prefect/start-worker.sh."""

    process: ServerProcess = field(repr=False)

    def stop(self) -> None:
        """Stop the worker (and any flow-run processes it started) now."""
        self.process.stop()


def _prefect_settings(workdir: Path) -> dict[str, str]:
    """A private PREFECT_HOME (never ~/.prefect) and no telemetry."""
    return {"PREFECT_HOME": str(workdir / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@contextlib.contextmanager
def prefect_server(
    database_url: str, env: Mapping[str, str] | None = None, timeout: float = 180.0
) -> Iterator[PrefectServer]:
    """Run infra/prefect/start-server.sh on a free port until GET {api_url}/health answers.

    Args:
        database_url: postgresql+asyncpg://... e.g. PostgresServer.url("prefect", "postgresql+asyncpg").
        env: extra environment for the server.
        timeout: seconds to wait; the script migrates the database first.

    Returns:
        The running server (yielded).
    """
    port = free_port()
    api_url = f"http://{HOST}:{port}/api"
    script = REPO_ROOT / "infra" / "prefect" / "start-server.sh"
    with scratch_dir("prefect-test-") as workdir:
        settings = {
            **_prefect_settings(workdir),
            "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
            "PREFECT_SERVER_API_HOST": HOST,
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_API_URL": api_url,
        }
        process = start_process(
            "prefect", ["bash", str(script)], workdir, venv_env({**(env or {}), **settings})
        )
        with running(process):
            process.wait_until(lambda: http_status(f"{api_url}/health") == 200, timeout)
            yield PrefectServer(api_url=api_url, process=process)


def _post_json(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with _direct.open(request, timeout=5) as response:
        return json.load(response)


def _worker_registered(api_url: str) -> bool:
    """Whether any work pool on the server has a worker that has sent a heartbeat."""
    try:
        pools = _post_json(f"{api_url}/work_pools/filter", {})
        return any(_post_json(f"{api_url}/work_pools/{pool['name']}/workers/filter", {}) for pool in pools)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def prefect_worker(
    api_url: str, project_root: Path, env: Mapping[str, str] | None = None, timeout: float = 300.0
) -> Iterator[PrefectWorker]:
    """Run <project_root>/infra/prefect/start-worker.sh until its worker is registered with the server.

    The script works in the folder two levels above itself, so a copied project runs
    its own copy. It registers the project's deployments before starting the worker,
    so both exist once this yields.

    Args:
        api_url: PrefectServer.api_url.
        project_root: the project (or a copy of it) whose script and code to run.
        env: extra environment, e.g. MLFLOW_TRACKING_URI and S3Server.env() for the flow runs.
        timeout: seconds to wait for the worker's first heartbeat.

    Returns:
        The running worker (yielded).
    """
    script = Path(project_root) / "infra" / "prefect" / "start-worker.sh"
    with scratch_dir("prefect-worker-test-") as workdir:
        settings = {**_prefect_settings(workdir), "PREFECT_API_URL": api_url}
        process = start_process(
            "prefect-worker",
            ["bash", str(script)],
            workdir,
            venv_env({**(env or {}), **settings}),
            cwd=project_root,
        )
        with running(process):
            process.wait_until(lambda: _worker_registered(api_url), timeout)
            yield PrefectWorker(process=process)
