"""Group commit of audit appends (server/audit/group.py)."""
from __future__ import annotations

import threading

import pytest

from server.audit.balp import audit_event
from server.audit.group import GroupCommit
from server.audit.log import AuditLog
from server.config import load_config
from server.errors import InternalError
from server.store import SqlStore


def event(i: int) -> dict:
    return audit_event(action="R", subtype="read", outcome="0", agent=f"c{i}", patients=[str(i)],
                       query=None, what=[], source="real", recorded=1.0e9 + i)


@pytest.fixture
def log(db_url, tmp_path):
    cfg = load_config({"database_url": db_url, "data_dir": str(tmp_path)})
    store = SqlStore.from_url(db_url, cfg)
    yield AuditLog(store.engine, cfg)
    store.engine.dispose()


def test_concurrent_appends_share_transactions_and_stay_contiguous(log, monkeypatch):
    calls: list[int] = []
    real = log.append_many

    def counting(events):
        calls.append(len(events))
        return real(events)

    monkeypatch.setattr(log, "append_many", counting)
    group = GroupCommit(log)
    seqs: list[int] = []
    lock = threading.Lock()

    def work(i):
        for j in range(10):
            s = group.append(event(i * 100 + j))
            with lock:
                seqs.append(s)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(80))
    assert sum(calls) == 80 and len(calls) <= 80
    assert log.verify().ok


def test_a_failed_batch_fails_every_request_in_it(log, monkeypatch):
    def broken(events):
        raise RuntimeError("disk full")

    monkeypatch.setattr(log, "append_many", broken)
    with pytest.raises(InternalError):
        GroupCommit(log).append(event(1))
    assert log.tree_size() == 0
