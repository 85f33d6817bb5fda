"""End-to-end: a synthetic cohort served by the real `synthport serve` (gunicorn, 2 workers
and the DIMSE listener): identical bytes from every worker and after a restart, and the
cohort's AE title answering C-FIND."""
from __future__ import annotations

import concurrent.futures as cf

import orjson
import pytest
import requests

from tests.e2e.server import free_port, run_server

pytestmark = pytest.mark.e2e


@pytest.fixture
def prepared(tmp_path, db_url):
    """A data dir whose database holds a tiny model and cohort ``e2e`` (40 patients)."""
    import torch

    torch.set_num_threads(1)
    from mappings.tables import map_records
    from server.db.engine import make_engine, migrate
    from server.synthetic.cohort import create_cohort
    from server.synthetic.demo import demo_population
    from server.synthetic.registry import ModelInfo, Registry, now
    from server.synthetic.training import TrainSettings, fit_models

    data_dir = tmp_path / "synthport-data"          # the folder run_server uses
    url = db_url or f"sqlite:///{data_dir / 'synthport.db'}"
    engine = make_engine(url)
    migrate(engine)
    reg = Registry(engine, data_dir)
    folder = reg.model_dir("tiny", 1)
    fit_models(map_records(demo_population(24, seed=2), min_count=1), folder,
               TrainSettings(epochs=2, event_epochs=1, image_epochs=0, hidden=16,
                             event_hidden=16, progress=False), echo=lambda _m: None)
    reg.register_model(ModelInfo("tiny", 1, ["patients", "events", "images"], str(folder),
                                 "0" * 64, {}, {}, None, None, now()))
    create_cohort(reg, "e2e", "tiny", 40, 11)
    engine.dispose()
    return tmp_path, db_url


def _get(url: str) -> bytes:
    with requests.Session() as s:   # a new connection each time: any worker may answer
        r = s.get(url, headers={"Accept": "application/fhir+json", "Connection": "close"},
                  timeout=60)
    assert r.status_code == 200, r.text
    return r.content


def test_cohort_patient_identical_across_workers_and_restart(prepared):
    tmp_path, db_url = prepared
    dimse_port = free_port()
    env = {"OMP_NUM_THREADS": "1", "SYNTHPORT_DIMSE_PORT": str(dimse_port)}
    with run_server(tmp_path, db_url, extra_env=env, workers=2) as base:
        root = base.removesuffix("/fhir")
        url = f"{root}/synthetic/e2e/fhir/Patient/e2e-3"
        with cf.ThreadPoolExecutor(4) as pool:
            bodies = list(pool.map(_get, [url] * 12))
        assert len(set(bodies)) == 1
        everything = _get(f"{url}/$everything")
        assert b'"e2e-3"' in bodies[0]
        r = requests.post(f"{root}/synthetic/e2e/fhir/Patient", json={"resourceType": "Patient"},
                          headers={"Content-Type": "application/fhir+json"}, timeout=30)
        assert r.status_code == 405 and r.json()["resourceType"] == "OperationOutcome"
        _c_find_cohort(dimse_port)
    with run_server(tmp_path, db_url, extra_env=env, workers=2) as base:   # a restart
        root = base.removesuffix("/fhir")
        assert _get(f"{root}/synthetic/e2e/fhir/Patient/e2e-3") == bodies[0]
        again = _get(f"{root}/synthetic/e2e/fhir/Patient/e2e-3/$everything")
        # the Bundle's own id, timestamp and fullUrls (a new port) differ; not its resources
        assert [e["resource"] for e in orjson.loads(again)["entry"]] == \
            [e["resource"] for e in orjson.loads(everything)["entry"]]


def _c_find_cohort(port: int) -> None:
    pytest.importorskip("pynetdicom")
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as FIND

    ae = AE(ae_title="E2ESCU")
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title="E2E")
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "PATIENT"
    q.PatientID = "e2e-3"
    q.PatientName = ""
    found = [i for st, i in assoc.send_c_find(q, FIND) if st.Status in (0xFF00, 0xFF01)]
    assoc.release()
    # a patient appears at the PATIENT level only when it has imaging studies
    assert all(f.PatientID == "e2e-3" for f in found)
