"""The temporary Prefect server of a run with no Prefect server configured, tied to the run's process.

With no PREFECT_API_URL, Prefect starts a temporary API server as a child
process the first time a client needs one, and stops it at exit. A run killed
with SIGKILL never reaches that exit, and the server lives on. The entry
points (`python -m flows.training`, ...) therefore start that server
themselves, from the main thread, as a child that ends with its parent
(pipeline/children.py), and hand it to Prefect as the temporary server it
would have started: Prefect's own code then finds it and starts no other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import prefect
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, get_current_settings

from pipeline import children


class TiedServer(SubprocessASGIServer):
    """Prefect's temporary server (its start, health check and stop), started as a tied child."""

    _instances: dict[int | None, SubprocessASGIServer] = {}  # apart from Prefect's own

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        # The command and environment of SubprocessASGIServer._run_uvicorn_command in Prefect 3.8.
        return children.start(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(prefect.__module_path__.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env={
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
                **get_current_settings().to_environment_variables(exclude_unset=True),
            },
        )


@contextmanager
def temporary_server() -> Iterator[str | None]:
    """Prefect's temporary server for the block, as a child that ends if this process is killed.

    Call it from the main thread: the server is tied to the thread that starts it.
    Nothing is started when a Prefect server is configured (PREFECT_API_URL) or
    temporary servers are off (Prefect then says what to set).

    Yields:
        The temporary server's API URL, or None when none was started.
    """
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield None
        return
    server = TiedServer()
    default = SubprocessASGIServer._instances.get(None)
    # Prefect asks SubprocessASGIServer() for its temporary server; the key None is that one.
    SubprocessASGIServer._instances[None] = server
    try:
        server.start()
        yield server.api_url
    finally:
        try:  # the run's last logs and events go out before the server stops
            APILogWorker.drain_all(timeout=10, at_exit=False)
            EventsWorker.drain_all(timeout=10, at_exit=False)
        finally:
            server.stop()
            if default is None:
                SubprocessASGIServer._instances.pop(None, None)
            else:
                SubprocessASGIServer._instances[None] = default
