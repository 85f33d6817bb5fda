"""Research consent (server/consent.py) on what generators read: training snapshots and
exports go through ``iter_source_records``, which leaves out opted-out patients."""
from __future__ import annotations

import pytest

from server.config import load_config
from server.consent import ConsentPolicy, consent_decision
from server.mapping_export import iter_source_records
from server.source import RequestContext
from server.store import SqlStore

SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"


def consent(pid: str, kind: str, *, code: str = "research", status: str = "active",
            period: dict | None = None, when: str = "2025-01-01") -> dict:
    prov = {"type": kind}
    if period:
        prov["period"] = period
    return {"resourceType": "Consent", "status": status, "dateTime": when,
            "scope": {"coding": [{"system": SCOPE, "code": code}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
            "patient": {"reference": f"Patient/{pid}"},
            "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                       "code": "OPTOUT" if kind == "deny" else "OPTIN"}]},
            "provision": prov}


@pytest.fixture
def store(db_url, tmp_path):
    def make(default="opt-out"):
        cfg = load_config({"database_url": db_url, "data_dir": str(tmp_path),
                           "consent_default": default})
        return SqlStore.from_url(db_url, cfg)
    s = make()
    ctx = RequestContext()
    for pid in ("a", "b", "c"):
        s.update(ctx, "Patient", pid, {"resourceType": "Patient", "id": pid})
    s.create(ctx, "Consent", consent("b", "deny"))
    s.create(ctx, "Consent", consent("c", "deny", when="2024-01-01"))
    s.create(ctx, "Consent", consent("c", "permit", when="2025-06-01"))   # newer: wins
    s.make = make
    yield s
    s.engine.dispose()


def patients_read(store) -> list[str]:
    return sorted(next(r["id"] for r in rec if r["resourceType"] == "Patient")
                  for rec in iter_source_records(store))


def test_opt_out_default_leaves_out_denials(store):
    assert patients_read(store) == ["a", "c"]


def test_opt_in_default_keeps_only_permits(store):
    s2 = store.make("opt-in")
    assert patients_read(s2) == ["c"]
    s2.engine.dispose()


def test_decision_rules():
    now = 1_750_000_000.0   # 2025-06-15
    assert consent_decision(consent("x", "deny"), now) == "deny"
    assert consent_decision(consent("x", "deny", status="inactive"), now) is None
    assert consent_decision(consent("x", "deny", code="treatment"), now) is None
    assert consent_decision(consent("x", "deny", code="patient-privacy"), now) == "deny"
    assert consent_decision(consent("x", "deny", period={"end": "2020-01-01"}), now) is None
    assert consent_decision(consent("x", "deny", period={"start": "2030-01-01"}), now) is None


def test_policy_rejects_unknown_default(store):
    with pytest.raises(ValueError):
        ConsentPolicy(store, "maybe")
