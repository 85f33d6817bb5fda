"""Large uploads spread over gunicorn's workers (server/http/balance.py), on a real server.

Which worker holds a connection is read from Linux's /proc: the server side of the
connection is the socket in /proc/net/tcp whose ports are the client's pair, and the worker
is the process with a descriptor on that socket.
"""
from __future__ import annotations

import fcntl
import http.client
import json
import os
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from server.db.engine import writer_lock_path
from tests.e2e.server import run_server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc/net/tcp").exists(),
                                reason="reads sockets' owners from Linux's /proc")


def _server_socket_inode(server_port: int, client_port: int) -> str | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            local, remote, inode = f[1], f[2], f[9]
            if int(local.rsplit(":", 1)[1], 16) == server_port and \
                    int(remote.rsplit(":", 1)[1], 16) == client_port and inode != "0":
                return inode
    return None


def _owner(server_port: int, client_port: int, timeout: float = 10.0) -> int:
    """The pid of the server process holding the server side of a connection."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inode = _server_socket_inode(server_port, client_port)
        if inode:
            want = f"socket:[{inode}]"
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    fds = os.listdir(f"/proc/{pid}/fd")
                except OSError:
                    continue
                for fd in fds:
                    try:
                        if os.readlink(f"/proc/{pid}/fd/{fd}") == want:
                            return int(pid)
                    except OSError:
                        continue
        time.sleep(0.02)
    raise AssertionError(f"no server process holds the connection from port {client_port}")


def test_new_connections_go_to_the_worker_without_an_upload(tmp_path):
    """While one worker runs a large upload that waits for the write lock (its process is
    idle, so it would win the race to ``accept`` as often as the free worker), every new
    connection still goes to the other worker."""
    entries = [{"resource": {"resourceType": "Basic", "code": {"text": f"x{i}" + "y" * 100}},
                "request": {"method": "POST", "url": "Basic"}} for i in range(2500)]
    body = json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}).encode()
    assert len(body) >= 256 * 1024          # http_close_after_bytes: a "large" upload
    with run_server(tmp_path, None, workers=2, extra_args=["--threads", "4"]) as base, \
            open(writer_lock_path(str(tmp_path / "synthport-data" / "synthport.db")), "a+") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)      # the writers' queue (server/db/engine.py)
        u = urlsplit(base)
        port = u.port
        up = http.client.HTTPConnection(u.hostname, port, timeout=300)
        up.connect()
        up_worker = _owner(port, up.sock.getsockname()[1])
        done = threading.Event()
        result: dict = {}

        def upload():
            try:
                up.request("POST", "/fhir", body=body, headers={
                    "Content-Type": "application/fhir+json", "Prefer": "return=minimal"})
                r = up.getresponse()
                result["status"], result["body"] = r.status, r.read()
            finally:
                done.set()

        t = threading.Thread(target=upload)
        t.start()
        time.sleep(1.0)                      # the upload is read and waits for the lock
        owners = []
        others = []
        try:
            for _ in range(30):
                c = http.client.HTTPConnection(u.hostname, port, timeout=60)
                c.request("GET", "/fhir/metadata")
                r = c.getresponse()
                r.read()
                assert r.status == 200
                owners.append(_owner(port, c.sock.getsockname()[1]))
                others.append(c)             # kept open: its owner stays readable
            in_flight = not done.is_set()
        finally:
            fcntl.flock(lk, fcntl.LOCK_UN)
            t.join(timeout=300)
            for c in others:
                c.close()
            up.close()
        assert result.get("status") == 200, result
        assert in_flight, "the upload ended while the test held the write lock"
        # every new connection went to the other worker while the upload ran
        assert up_worker not in owners, (up_worker, owners)
        assert len(set(owners)) == 1
