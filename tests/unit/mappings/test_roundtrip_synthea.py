"""Round trip on the Synthea US transaction bundles of ../shared/data.

The regenerated records validate (fhir.resources R4B) and, mapped again, give the same
events (kind, code system, code, normalised unit and value, coded value, day, encounter
and parent links) and the same patient table.
"""
from __future__ import annotations

import pytest

from mappings.records import iter_synthea_folder

from .roundtrip_helpers import check, round_trip

N_SYNTHEA = 6


@pytest.mark.shared_data
def test_synthea_round_trip(shared_data):
    records = list(iter_synthea_folder(shared_data / "synthea-us-120", limit=N_SYNTHEA))
    assert len(records) == N_SYNTHEA
    src, regenerated, again = round_trip(records)
    assert set(src.events["kind"].unique()) >= {"encounter", "condition_onset", "observation",
                                                 "procedure", "medication", "immunization",
                                                 "diagnostic_report"}
    check(src, regenerated, again)
    # dates to the day, patient level
    for rec, orig in zip(regenerated, records):
        assert rec[0]["birthDate"] == orig[0]["birthDate"]
        assert rec[0].get("gender") == orig[0].get("gender")
        if "deceasedDateTime" in orig[0]:
            assert "deceasedDateTime" in rec[0]
