"""The audit spool (SQLite): entries spooled by any process reach the log once, before
anyone reads it, and never twice."""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from server.audit.spool import SpooledLog
from server.errors import InternalError
from tests.unit.server.audit.conftest import make_event


@pytest.fixture
def sqlite_log(tmp_path: Path, audit_cfg):
    from server.audit.log import AuditLog
    from server.db.engine import make_engine, migrate

    engine = make_engine(f"sqlite:///{tmp_path}/a.db")
    migrate(engine)
    try:
        yield AuditLog(engine, audit_cfg)
    finally:
        engine.dispose()


def _spool(log, tmp_path: Path, interval: float = 0) -> SpooledLog:
    return SpooledLog(log, tmp_path / "spool", interval=interval)


def _segments(sp: SpooledLog) -> list[Path]:
    return sorted(sp.folder.glob("*.jsonl"))


def test_spooled_entries_are_merged_before_the_log_is_read(sqlite_log, tmp_path):
    sp = _spool(sqlite_log, tmp_path)
    for i in range(5):
        assert sp.append(make_event(i)) is None          # no seq until merged
    assert sqlite_log.tree_size() == 0                   # the log itself: not yet
    assert sp.tree_size() == 5                           # a reader merges first
    page = sp.search([("agent", "client-1")])
    assert len(page.matches) == 2
    assert sp.verify().ok
    assert _segments(sp) == []                           # merged segments are removed
    sp.append(make_event(9))                             # a new segment after the removal
    assert sp.tree_size() == 6


def test_entries_inside_a_write_transaction_are_written_at_once(sqlite_log, tmp_path):
    from server.db.engine import begin_write

    sp = _spool(sqlite_log, tmp_path)
    c = begin_write(sqlite_log.engine)
    try:
        with c.begin():
            assert sp.append(make_event(0), conn=c) == 0
    finally:
        c.close()
    assert sqlite_log.tree_size() == 1 and _segments(sp) == []


def test_a_crash_between_merge_and_removal_never_merges_twice(sqlite_log, tmp_path, monkeypatch):
    sp = _spool(sqlite_log, tmp_path)
    for i in range(3):
        sp.append(make_event(i))
    real_unlink = os.unlink

    def crash(path, *a, **k):
        raise KeyboardInterrupt("killed after the commit")

    monkeypatch.setattr(os, "unlink", crash)
    with pytest.raises(KeyboardInterrupt):
        sp.flush()
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert sqlite_log.tree_size() == 3 and len(_segments(sp)) == 1   # committed, file left
    # a fresh process (another SpooledLog) resumes from the recorded offset
    other = _spool(sqlite_log, tmp_path)
    assert other.flush() == 0
    assert sqlite_log.tree_size() == 3 and _segments(sp) == []
    with sqlite_log.engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM audit_spool")).scalar_one() == 0


def test_a_failed_merge_keeps_the_entries_spooled(sqlite_log, tmp_path, monkeypatch):
    sp = _spool(sqlite_log, tmp_path)
    sp.append(make_event(0))
    sp.append(make_event(1))

    def broken(*a, **k):
        raise InternalError("database is locked")

    monkeypatch.setattr(sqlite_log, "append_many", broken)
    with pytest.raises(InternalError):
        sp.tree_size()                                   # a reader that cannot merge fails
    monkeypatch.undo()
    assert sp.tree_size() == 2 and sp.verify().ok


def test_an_entry_that_cannot_be_spooled_fails_and_leaves_no_partial_line(sqlite_log, tmp_path,
                                                                         monkeypatch):
    sp = _spool(sqlite_log, tmp_path)
    sp.append(make_event(0))
    real_write = os.write

    def half(fd, data):
        real_write(fd, data[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half)
    with pytest.raises(InternalError, match="could not be spooled"):
        sp.append(make_event(1))
    monkeypatch.undo()
    (seg,) = _segments(sp)
    assert seg.read_bytes().count(b"\n") == 1 and seg.read_bytes().endswith(b"\n")
    assert sp.tree_size() == 1


def test_only_whole_lines_are_merged(sqlite_log, tmp_path):
    sp = _spool(sqlite_log, tmp_path)
    sp.append(make_event(0))
    (seg,) = _segments(sp)
    with open(seg, "ab") as f:                           # a writer killed mid-line
        f.write(b'{"resourceType": "AuditEv')
    assert sp.flush() == 1
    assert seg.exists()                                  # the rest waits for its newline
    assert sp.flush() == 0 and sqlite_log.tree_size() == 1


def _child(db: str, folder: str, n: int) -> None:
    from server.audit.log import AuditLog
    from server.config import load_config
    from server.db.engine import make_engine

    engine = make_engine(f"sqlite:///{db}")
    sp = SpooledLog(AuditLog(engine, load_config({"data_dir": folder}, environ={})), folder, interval=0)
    for i in range(n):
        sp.append(make_event(i, agent="child"))
    os._exit(0)                                          # dies without merging


def test_entries_of_a_process_that_died_are_merged_by_another(sqlite_log, tmp_path):
    sp = _spool(sqlite_log, tmp_path)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_child, args=(str(tmp_path / "a.db"), str(sp.folder), 7))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    sp.append(make_event(0, agent="parent"))
    assert sp.tree_size() == 8
    assert len(sp.search([("agent", "child")]).matches) == 7


def test_the_background_merger_empties_the_spool(sqlite_log, tmp_path, monkeypatch):
    import server.audit.spool as spool

    monkeypatch.setattr(spool, "IDLE_EXIT", 0.3)
    sp = _spool(sqlite_log, tmp_path, interval=0.05)

    def merged(n: int) -> bool:
        deadline = time.monotonic() + 10
        while sqlite_log.tree_size() < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return sqlite_log.tree_size() == n

    sp.append(make_event(0))                  # a single entry is merged too
    assert merged(1)
    for i in range(1, 4):
        sp.append(make_event(i))
    assert merged(4)
    deadline = time.monotonic() + 10          # idle: the thread ends ...
    while sp._thread is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sp._thread is None
    sp.append(make_event(4))                  # ... and the next append starts another
    assert merged(5)


def test_audit_writer_spools_only_on_a_sqlite_file(db_url, tmp_path):
    from server.access import audit_writer
    from server.audit.group import GroupCommit
    from server.audit.log import AuditLog
    from server.config import load_config
    from server.db.engine import make_engine

    engine = make_engine(db_url)
    try:
        cfg = load_config({"data_dir": str(tmp_path / "d"), "database_url": db_url}, environ={})
        w = audit_writer(AuditLog(engine, cfg), cfg)
        if db_url.startswith("sqlite"):
            assert isinstance(w, SpooledLog)
            assert str(w.folder) == engine.url.database + "-audit-spool"
            off = load_config({"data_dir": str(tmp_path / "d"), "database_url": db_url,
                               "audit_spool": False}, environ={})
            assert isinstance(audit_writer(AuditLog(engine, off), off), GroupCommit)
        else:
            assert isinstance(w, GroupCommit)
    finally:
        engine.dispose()


def test_a_full_segment_is_closed_and_removed_once_merged(sqlite_log, tmp_path, monkeypatch):
    import server.audit.spool as spool

    monkeypatch.setattr(spool, "SEGMENT_BYTES", 3000)   # about two entries
    sp = _spool(sqlite_log, tmp_path)
    for i in range(7):
        sp.append(make_event(i))
    assert len(_segments(sp)) >= 3
    assert sp.flush() == 7
    assert len(_segments(sp)) <= 1                      # only the one still being written
    sp.append(make_event(7))
    assert sp.tree_size() == 8 and sp.verify().ok
