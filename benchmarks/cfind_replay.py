"""The server's side of one C-FIND association, without the client's process start.

``findscu`` p50 (dicom_bench.py) is dcmtk's process start and dictionary load (17-25 ms
here, the same for every server) plus the server's association. This script starts
``synthport serve`` as dicom_bench.py does (auth required, audit on), stores two
one-instance studies with ``storescu``, records the PDUs of one real ``findscu`` run
(STUDY level, universal match, as dicom_bench.py asks) through a recording proxy, then
replays them N times over raw sockets with ``TCP_NODELAY``, one new association each,
and prints:

* p50 of association set-up (connect + A-ASSOCIATE-RQ -> AC), find (P-DATA -> final
  response) and release (A-RELEASE-RQ -> RP), and their sum;
* the listener process's CPU per association (user and system time from ``/proc``
  over the N associations; it does not depend on how the wall time is shared);
* with ``--findscu K``: ``findscu`` p50 over K runs and against a closed port (the
  client's floor).

``--pace MS`` sleeps between associations, as ``findscu``'s process start does (a server
that idles between associations is colder). With ``--orthanc`` the same replay runs
against Orthanc (no CPU figure). Prints figures, never pass/fail.

Usage::

    python benchmarks/cfind_replay.py [--n 500] [--pace 0] [--findscu 0] [--orthanc]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dicom_bench  # noqa: E402

from tests.e2e.dimse_tools import dcmtk  # noqa: E402

NODELAY = {**os.environ, "TCP_NODELAY": "1"}
QUERY = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "PatientName"]
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, P_DATA_TF, A_RELEASE_RP = 1, 2, 4, 6
RELEASE_RQ = bytes([5, 0, 0, 0, 0, 4, 0, 0, 0, 0])     # PS3.8 §9.3.6: fixed, 10 bytes


def read_pdu(s: socket.socket) -> bytes:
    """One whole PDU (PS3.8 §9.3: type, reserved, 4-byte big-endian length)."""
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    head = exactly(6)
    return head + exactly(struct.unpack(">I", head[2:6])[0])


def record(port: int, findscu: str, aet: str) -> list[bytes]:
    """The PDUs one ``findscu`` run sends (up to its release, which the proxy may
    not see: the peer can close first), through a forwarding proxy."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    sent: list[bytes] = []

    def run() -> None:
        c, _ = ls.accept()
        s = socket.create_connection(("127.0.0.1", port))

        def back() -> None:
            with contextlib.suppress(OSError):
                while (data := s.recv(65536)):
                    c.sendall(data)
            c.close()

        threading.Thread(target=back, daemon=True).start()
        with contextlib.suppress(EOFError, OSError):
            while True:
                pdu = read_pdu(c)
                sent.append(pdu)
                s.sendall(pdu)
        s.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    proc = subprocess.run([findscu, *QUERY, "-aec", aet, "127.0.0.1", str(ls.getsockname()[1])],
                          env=NODELAY, capture_output=True, text=True)
    t.join(10)
    ls.close()
    if proc.returncode or "E:" in proc.stdout + proc.stderr:   # exits 0 when aborted too
        raise SystemExit(f"findscu failed: {(proc.stdout + proc.stderr)[-400:]}")
    return sent


def final_status(pdu: bytes) -> bool:
    """A P-DATA-TF holding a C-FIND-RSP command whose Status (0000,0900) is not Pending."""
    i = pdu.find(b"\x00\x00\x00\x09\x02\x00\x00\x00")   # implicit VR LE: tag, length 2
    return i > 0 and pdu[i + 8:i + 10] not in (b"\x00\xff", b"\x01\xff")


def replay(port: int, pdus: list[bytes]) -> tuple[float, float, float]:
    rq = next(p for p in pdus if p[0] == A_ASSOCIATE_RQ)
    data = [p for p in pdus if p[0] == P_DATA_TF]
    t0 = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(rq)
    if read_pdu(s)[0] != A_ASSOCIATE_AC:
        raise SystemExit("association not accepted")
    t1 = time.perf_counter()
    for p in data:
        s.sendall(p)
    while not final_status(read_pdu(s)):
        pass
    t2 = time.perf_counter()
    s.sendall(RELEASE_RQ)
    if read_pdu(s)[0] != A_RELEASE_RP:
        raise SystemExit("no A-RELEASE-RP")
    t3 = time.perf_counter()
    s.close()
    return t1 - t0, t2 - t1, t3 - t2


def cpu_seconds(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick   # utime, stime (proc(5))


def listener_pid(port: int) -> int | None:
    """The process listening on ``port`` (the DIMSE child of ``synthport serve``)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True,
                         text=True).stdout
    for part in out.split("pid=")[1:]:
        return int(part.split(",", 1)[0])
    return None


def measure(name: str, port: int, aet: str, args, findscu: str | None) -> None:
    pdus = record(port, findscu, aet)
    for _ in range(20):
        replay(port, pdus)
    pid = listener_pid(port) if name == "synthport" else None
    c0 = cpu_seconds(pid) if pid else None
    xs = []
    for _ in range(args.n):
        xs.append(replay(port, pdus))
        if args.pace:
            time.sleep(args.pace / 1000)
    line = (f"[{name}] replay of findscu's PDUs, {args.n} associations"
            f"{f' {args.pace:g} ms apart' if args.pace else ''}: p50 set-up "
            f"{statistics.median(x[0] for x in xs) * 1e3:.2f}, find "
            f"{statistics.median(x[1] for x in xs) * 1e3:.2f}, release "
            f"{statistics.median(x[2] for x in xs) * 1e3:.2f}, total "
            f"{statistics.median(sum(x) for x in xs) * 1e3:.2f} ms")
    if c0:
        c1 = cpu_seconds(pid)
        line += (f"; listener CPU per association: user {(c1[0] - c0[0]) / args.n * 1e3:.2f}, "
                 f"system {(c1[1] - c0[1]) / args.n * 1e3:.2f} ms")
    print(line + f"  (load {os.getloadavg()[0]:.2f})", flush=True)
    if args.findscu:
        ts = []
        for _ in range(args.findscu):
            t = time.perf_counter()
            subprocess.run([findscu, *QUERY, "-aec", aet, "127.0.0.1", str(port)], env=NODELAY,
                           capture_output=True, check=True)
            ts.append(time.perf_counter() - t)
        print(f"[{name}] findscu p50 {statistics.median(ts) * 1e3:.2f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500, help="replayed associations")
    ap.add_argument("--pace", type=float, default=0, help="ms between associations")
    ap.add_argument("--findscu", type=int, default=0, help="also time K findscu runs")
    ap.add_argument("--orthanc", action="store_true", help="also replay against Orthanc")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    storescu, findscu = dcmtk("storescu"), dcmtk("findscu")
    if not (storescu and findscu):
        raise SystemExit("needs dcmtk's storescu and findscu (apt-get install dcmtk)")
    from pydicom.data import get_testdata_file

    files = [get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        targets = [("synthport", *stack.enter_context(
            dicom_bench.synthport_server(Path(tmp) / "srv", args.workers))[1:])]
        if args.orthanc:
            targets.append(("orthanc", *stack.enter_context(
                dicom_bench.orthanc_server(Path(tmp) / "orthanc"))[1:]))
        for name, port, aet in targets:
            subprocess.run([storescu, "-aec", aet, "127.0.0.1", str(port), *files], env=NODELAY,
                           capture_output=True, check=True)
        if args.findscu:
            ts = []
            for _ in range(args.findscu):
                t = time.perf_counter()
                subprocess.run([findscu, *QUERY, "-aec", "NONE", "127.0.0.1", "1"], env=NODELAY,
                               capture_output=True)
                ts.append(time.perf_counter() - t)
            print(f"findscu against a closed port (the client's floor) p50 "
                  f"{statistics.median(ts) * 1e3:.2f} ms", flush=True)
        for name, port, aet in targets:
            measure(name, port, aet, args, findscu)


if __name__ == "__main__":
    main()
