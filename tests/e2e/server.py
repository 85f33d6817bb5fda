"""Start the real ``synthport serve`` (gunicorn) as a subprocess for end-to-end tests.

Usage::

    from tests.e2e.server import run_server

    def test_metadata(tmp_path, db_url):
        with run_server(tmp_path, db_url) as base:      # base = http://127.0.0.1:PORT/fhir
            r = requests.get(f"{base}/metadata")

``run_server`` only needs a folder and a database URL, so it can equally be used
from a session- or module-scoped fixture (pass ``tmp_path_factory.mktemp(...)``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (bind to port 0, read, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthport_command() -> list[str]:
    """The ``synthport`` console script of the running interpreter's environment."""
    beside = Path(sys.executable).parent / "synthport"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("synthport")
    if found:
        return [found]
    # Not installed as a script (should not happen after `pip install -e .`):
    # the same entry point, through the interpreter.
    return [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())"]


def _tail(path: Path, limit: int = 8000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no output captured>"
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL after STOP_GRACE_S."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_GRACE_S)
    # gunicorn workers left behind by a master that died first
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def run_server(
    tmp_path: Path,
    db_url: str | None,
    extra_env: Mapping[str, str] | None = None,
    *,
    workers: int = 2,
    extra_args: list[str] | None = None,
    start_timeout: float = START_TIMEOUT_S,
) -> Iterator[str]:
    """Run ``synthport serve`` and yield its FHIR base URL ``http://127.0.0.1:PORT/fhir``.

    Args:
        tmp_path: a folder of the test; the server's data dir and logs go below it.
        db_url: the SQLAlchemy URL the server must use (``db_url`` fixture); passed as
            ``SYNTHPORT_DATABASE_URL``. ``None`` means the default SQLite file in the
            data dir.
        extra_env: more environment variables for the server (applied last).
        workers: gunicorn workers (``--workers``).
        extra_args: more arguments after ``synthport serve ...``.
        start_timeout: seconds to wait for ``GET /fhir/metadata`` to answer 200.

    The server's environment is the test process's, minus every inherited
    ``SYNTHPORT_*`` variable (so a developer's own settings do not leak into tests),
    plus the variables above. Fails the test with the server's captured output if it
    exits early or does not answer in time.
    """
    tmp_path = Path(tmp_path)
    data_dir = tmp_path / "synthport-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()

    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHPORT_")}
    env["PYTHONUNBUFFERED"] = "1"
    # A free DIMSE port too, so that several servers (tests run side by side,
    # other users of the machine) never fight over 11112.
    env["SYNTHPORT_DIMSE_PORT"] = str(free_port())
    if db_url:
        env["SYNTHPORT_DATABASE_URL"] = db_url
    # Development mode unless a test asks for access control (docs/security.md).
    env["SYNTHPORT_AUTH"] = "off"
    env.update(extra_env or {})

    cmd = synthport_command() + [
        "serve",
        "--http-port", str(port),
        "--data-dir", str(data_dir),
        "--workers", str(workers),
        *(extra_args or []),
    ]
    log_fd, log_name = tempfile.mkstemp(prefix="synthport-serve-", suffix=".log", dir=tmp_path)
    log_path = Path(log_name)
    base = f"http://127.0.0.1:{port}/fhir"
    with os.fdopen(log_fd, "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_ready(proc, base, start_timeout, log_path, cmd)
        yield base
    finally:
        _stop(proc)


def _wait_ready(proc: subprocess.Popen, base: str, timeout: float, log_path: Path,
                cmd: list[str]) -> None:
    import pytest

    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while True:
        code = proc.poll()
        if code is not None:
            pytest.fail(
                f"synthport serve exited with status {code} before answering.\n"
                f"command: {' '.join(cmd)}\n--- server output ---\n{_tail(log_path)}",
                pytrace=False,
            )
        try:
            req = urllib.request.Request(f"{base}/metadata",
                                         headers={"Accept": "application/fhir+json"})
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status == 200:
                    return
                last_error = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last_error = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(exc)
        if time.monotonic() >= deadline:
            _stop(proc)
            pytest.fail(
                f"synthport serve did not answer GET {base}/metadata with 200 within "
                f"{timeout:.0f} s (last: {last_error}).\ncommand: {' '.join(cmd)}\n"
                f"--- server output ---\n{_tail(log_path)}",
                pytrace=False,
            )
        time.sleep(0.2)
