"""Records -> event table and patient table on hand-written records."""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pandas as pd
import pytest

from mappings.events import EVENT_COLUMNS
from mappings.tables import map_records

from .records_fixture import small_cohort


@pytest.fixture(scope="module")
def mapped():
    return map_records(small_cohort(), min_count=2, reference_date=dt.date(2020, 1, 1))


def test_event_table_schema(mapped):
    ev = mapped.events
    assert list(ev.columns) == EVENT_COLUMNS
    assert str(ev["kind"].dtype) == "category"
    assert ev["t_days"].dtype == np.float64
    assert set(ev["kind"].unique()) == {"encounter", "condition_onset", "condition_abatement",
                                        "observation", "procedure", "medication", "immunization",
                                        "diagnostic_report", "imaging_study"}
    assert not ev["t_days"].isna().any()
    assert set(mapped.event_meta["columns"]) == set(EVENT_COLUMNS)
    json.dumps(mapped.event_meta)
    json.dumps(mapped.patient_meta)


def test_events_of_one_patient(mapped):
    ev = mapped.events[mapped.events["patient_id"] == "p1"].set_index("event_id")
    # 2010-03-01T10:00+01:00 = 09:00 UTC, birth 1980-05-17 00:00 UTC
    days = (dt.datetime(2010, 3, 1, 9) - dt.datetime(1980, 5, 17)).total_seconds() / 86400
    assert ev.loc["p1-e1", "t_days"] == pytest.approx(days)
    assert ev.loc["p1-e1", "end_t_days"] == pytest.approx(days + 30 / 1440)
    assert ev.loc["p1-e1", "value_code"] == "AMB"
    assert ev.loc["p1-e1", "system"] == "http://snomed.info/sct"
    # the components of the BP panel are events with the panel as parent
    assert ev.loc["p1-bp#c0", "code"] == "8480-6" and ev.loc["p1-bp#c0", "parent_id"] == "p1-bp"
    assert ev.loc["p1-bp#c1", "value_num"] == 79.0 and ev.loc["p1-bp#c1", "unit"] == "mm[Hg]"
    # lab result points at its report; coded value kept with system and display
    assert ev.loc["p1-glu", "parent_id"] == "p1-dr"
    assert ev.loc["p1-smk", "value_code"] == "266919005"
    assert ev.loc["p1-smk", "value_display"] == "Never smoker"
    # entered-in-error is not an event
    assert "p1-err" not in ev.index
    # abatement: its own event, parent = the onset
    assert ev.loc["p1-c1#condition_abatement", "parent_id"] == "p1-c1"
    assert ev.loc["p1-c1#condition_abatement", "kind"] == "condition_abatement"
    # SNOMED preferred over ICD-10; ATC preferred over RxNorm; Medication resolved by reference
    assert ev.loc["p1-c2", "code"] == "44054006"
    assert ev.loc["p1-m1", "system"] == "http://www.whocc.no/atc"
    assert ev.loc["p1-m2", "code"] == "313782"
    assert ev.loc["p1-c1", "encounter_id"] == "p1-e1"
    # imaging: one event per series, study uid kept
    assert ev.loc["p1-img", "modality"] == "CR" and ev.loc["p1-img", "value_num"] == 2
    assert ev.loc["p1-img#s1", "modality"] == "DX" and ev.loc["p1-img#s1", "parent_id"] == "p1-img"
    assert ev.loc["p1-img", "body_site"] == "51185008"
    assert ev.loc["p1-img", "study_uid"].startswith("2.25.")


def test_units_normalised_through_ucum(mapped):
    ev = mapped.events
    w = ev[(ev["patient_id"] == "p2") & (ev["code"] == "29463-7")].sort_values("t_days")
    assert list(w["unit"]) == ["kg", "kg"]
    assert w["value_num"].iloc[0] == pytest.approx(154.0 * 0.45359237)
    units = mapped.event_meta["table"]["units"]["29463-7"]
    assert units["unit"] == "kg" and units["converted"] == 1


def test_patient_table_demographics(mapped):
    pt = mapped.patients
    assert pt.index.name == "patient_id"
    assert list(pt.index) == ["p1", "p2", "p3", "p4", "p5"]
    assert pt.loc["p2", "sex"] == "male" and str(pt["sex"].dtype) == "category"
    assert pt.loc["p1", "birth_year"] == 1980
    assert pt.loc["p1", "age"] == pytest.approx(
        (dt.date(2020, 1, 1) - dt.date(1980, 5, 17)).days / 365.25)
    assert bool(pt.loc["p3", "deceased"]) and not bool(pt.loc["p1", "deceased"])
    assert pt.loc["p3", "age_at_death"] == pytest.approx(
        (dt.datetime(2015, 2, 3, 4, 5, 6) - dt.datetime(1980, 5, 17)).total_seconds() / 86400 / 365.25)
    assert pt.loc["p1", "marital_status"] == "M" and pt.loc["p1", "country"] == "ES"
    assert pt.loc["p1", "language"] == "es"
    assert mapped.patient_meta["table"]["reference_date"] == "2020-01-01"


def test_vocabulary_top_k_and_other(mapped):
    pt = mapped.patients
    assert pt.loc["p1", "cond_44054006"] == 1 and pt.loc["p3", "cond_44054006"] == 0
    assert pt.loc["p3", "cond_44054006_onset_age"] != pt.loc["p3", "cond_44054006_onset_age"]  # NaN
    # the rare code (one patient < min_count 2) has no column and is counted in cond_other
    assert not any("999999999" in c for c in pt.columns)
    assert pt.loc["p3", "cond_other"] == 1 and pt.loc["p1", "cond_other"] == 0
    assert pt.loc["p1", "med_A10BA"] == 1          # ATC truncated to level 4 (5 chars)
    assert pt.loc["p1", "med_313782"] == 1
    assert pt.loc["p1", "proc_430193006"] == 1
    assert pt.loc["p1", "imm_140"] == 1
    assert pt.loc["p1", "enc_AMB"] == 1 and pt.loc["p1", "enc_EMER"] == 1
    assert pt.loc["p1", "img_CR_51185008"] == 1 and pt.loc["p5", "img_CR_51185008"] == 0
    meta = mapped.patient_meta["columns"]
    assert meta["cond_44054006"]["kind"] == "categorical"
    assert meta["cond_44054006"]["system"] == "http://snomed.info/sct"
    assert meta["cond_44054006"]["display"] == "Diabetes mellitus type 2"
    assert meta["birth_date"]["kind"] == "datetime"
    # top_k = 1 keeps only the most frequent condition
    small = map_records(small_cohort(), top_k=1, min_count=1)
    assert [c for c in small.patients.columns if c.startswith("cond_") and not c.endswith("_age")] \
        == ["cond_444814009", "cond_other"]


def test_observation_statistics(mapped):
    pt = mapped.patients
    assert pt.loc["p2", "obs_29463-7_n"] == 2
    assert pt.loc["p2", "obs_29463-7_last"] == pytest.approx(72.0)
    assert pt.loc["p2", "obs_29463-7_min"] == pytest.approx(154.0 * 0.45359237)
    assert pt.loc["p1", "obs_29463-7_mean"] == pytest.approx(71.0)
    assert pt.loc["p1", "obs_8480-6_max"] == pytest.approx(121.0)
    assert mapped.patient_meta["columns"]["obs_29463-7_mean"]["unit"] == "kg"
    assert pt.loc["p1", "obs_72166-2_last"] == "266919005"
    assert str(pt["obs_72166-2_last"].dtype) == "category"
    assert pt["obs_29463-7_n"].dtype == np.int64


def test_include_patient_predicate():
    mt = map_records(small_cohort(), include_patient=lambda p: p["gender"] == "male", min_count=1)
    assert list(mt.patients.index) == ["p2"]
    assert set(mt.events["patient_id"]) == {"p2"}
    assert mt.skipped["excluded by include_patient"] == 4


def test_record_without_patient_is_skipped():
    mt = map_records([[{"resourceType": "Observation", "id": "x"}]] + small_cohort()[:1], min_count=1)
    assert len(mt.patients) == 1 and mt.skipped["record without Patient"] == 1
    assert isinstance(mt.events, pd.DataFrame)
