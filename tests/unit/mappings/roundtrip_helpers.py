"""Round-trip helpers for ../shared/data: records -> tables -> FHIR -> tables.

For a sample of Synthea US transaction bundles and of EHDS Spanish document bundles, the
regenerated records validate (fhir.resources R4B) and, mapped again, give the same events
(kind, code system, code, normalised unit and value, coded value, modality, body site, day,
encounter and parent links) and the same patient table.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from mappings.reverse import tables_to_fhir, validate_record
from mappings.tables import map_records


def facts(mt) -> pd.Series:
    ev = mt.events.copy()
    for c in ev.columns:
        if c not in ("t_days", "end_t_days", "value_num"):
            ev[c] = ev[c].astype("object").where(ev[c].notna(), "-")
    by_id = ev.set_index(["patient_id", "event_id"])
    day = np.floor(ev["t_days"].to_numpy() + 1e-9).astype("int64")
    ev["day"] = day
    ev["end_day"] = np.floor(ev["end_t_days"].fillna(-1e9) + 1e-9).astype("int64")
    ev["v"] = ev["value_num"].round(6).fillna(-1e99)
    key = pd.Series(list(zip(ev["kind"], ev["code"], ev["day"])), index=by_id.index)
    ev["enc"] = [key.get((p, e), "-") if e != "-" else "-" for p, e in zip(ev["patient_id"], ev["encounter_id"])]
    ev["par"] = [key.get((p, e), "-") if e != "-" else "-" for p, e in zip(ev["patient_id"], ev["parent_id"])]
    cols = ["patient_id", "kind", "system", "code", "unit", "v", "value_code", "value_system",
            "modality", "body_site", "category", "study_uid", "series_uid", "day", "end_day",
            "enc", "par"]
    return ev[cols].astype(str).value_counts()


def round_trip(records):
    src = map_records(records)
    displays = src.event_meta["table"]["displays"]
    regenerated = list(tables_to_fhir(src.patients, src.events, keep_ids=True, displays=displays))
    for rec in regenerated:
        validate_record(rec)
    again = map_records(regenerated)
    return src, regenerated, again


def check(src, regenerated, again):
    a, b = facts(src), facts(again)
    diff = a.subtract(b, fill_value=0)
    assert len(src.events) == len(again.events)
    assert (diff == 0).all(), diff[diff != 0].head(20).to_string()
    pd.testing.assert_frame_equal(src.patients, again.patients, check_exact=False, rtol=1e-7,
                                  atol=1e-6)
    assert set(src.patients.columns) == set(again.patients.columns)
    # codes carry displays (every coding of the regenerated Conditions/Observations)
    for rec in regenerated:
        for r in rec:
            if r["resourceType"] in ("Condition", "Procedure", "Immunization"):
                key = "vaccineCode" if r["resourceType"] == "Immunization" else "code"
                assert r[key]["coding"][0].get("display"), r
