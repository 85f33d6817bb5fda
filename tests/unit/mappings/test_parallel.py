"""mappings.parallel.map_path: worker processes give the same tables as one process."""
from __future__ import annotations

import pandas as pd
import pytest

from mappings.parallel import map_path
from mappings.records import iter_synthea_folder
from mappings.tables import map_records

from .records_fixture import small_cohort


@pytest.mark.shared_data
def test_parallel_folder_equals_serial(shared_data):
    folder = shared_data / "synthea-us-120"
    serial = map_records(iter_synthea_folder(folder, limit=4), min_count=1)
    par = map_path(folder, jobs=2, limit=4, min_count=1)
    one = map_path(folder, jobs=1, limit=4, min_count=1)
    for other in (par, one):
        pd.testing.assert_frame_equal(other.patients, serial.patients)
        pd.testing.assert_frame_equal(other.events, serial.events)


def test_merge_state_keeps_first_of_duplicates(tmp_path):
    """Two documents of one patient, as two worker results: events and patient counted once."""
    import orjson

    rec = small_cohort()[0]
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in rec]}
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "a.json").write_bytes(orjson.dumps(bundle))
    (folder / "b.json").write_bytes(orjson.dumps(bundle))
    merged = map_path(folder, jobs=1, min_count=1)
    single = map_records([rec], min_count=1)
    pd.testing.assert_frame_equal(merged.events, single.events)
    pd.testing.assert_frame_equal(merged.patients, single.patients)
