"""End-to-end: the real `synthport serve` (gunicorn) driven by dicomweb-client's
DICOMwebClient: STOW-RS, QIDO-RS and WADO-RS, then the FHIR ImagingStudy it created."""
from __future__ import annotations

import numpy as np
import pytest
import requests

from tests.e2e.server import run_server
from tests.unit.server.dicom.factory import dataset

pytestmark = pytest.mark.e2e


def test_dicomweb_client_round_trip(tmp_path, db_url):
    from dicomweb_client.api import DICOMwebClient

    study = dataset().StudyInstanceUID
    series = dataset().SeriesInstanceUID
    sent = [dataset("CT_small.dcm", study=study, series=series, InstanceNumber=i + 1,
                    PatientID="E2E-1", PatientName="Client^Dicomweb") for i in range(3)]
    with run_server(tmp_path, db_url) as fhir_base:
        base = fhir_base.removesuffix("/fhir") + "/dicomweb"
        client = DICOMwebClient(url=base)

        result = client.store_instances(datasets=sent)
        assert len(result.ReferencedSOPSequence) == 3 and "FailedSOPSequence" not in result

        studies = client.search_for_studies(search_filters={"PatientID": "E2E-1"},
                                            fields=["StudyDescription"])
        assert len(studies) == 1
        assert studies[0]["0020000D"]["Value"] == [study]
        assert studies[0]["00201208"]["Value"] == [3]
        assert client.search_for_studies(search_filters={"PatientName": "client"},
                                         fuzzymatching=True)[0]["0020000D"]["Value"] == [study]
        [found_series] = client.search_for_series(study_instance_uid=study)
        assert found_series["0020000E"]["Value"] == [series]
        instances = client.search_for_instances(study_instance_uid=study, series_instance_uid=series,
                                                limit=2, offset=1)
        assert [i["00200013"]["Value"][0] for i in instances] == [2, 3]

        sop = sent[0].SOPInstanceUID
        ds = client.retrieve_instance(study, series, sop)
        assert ds.SOPInstanceUID == sop
        assert np.array_equal(ds.pixel_array, sent[0].pixel_array)

        metadata = client.retrieve_series_metadata(study, series)
        assert sorted(m["00080018"]["Value"][0] for m in metadata) == sorted(d.SOPInstanceUID for d in sent)
        # dicomweb-client sends "Host: 127.0.0.1" without the port, and URLs follow the
        # Host header (set public_base_url in production): compare the path only.
        uri = metadata[0]["7FE00010"]["BulkDataURI"]
        assert uri.startswith("http://127.0.0.1") and "/dicomweb/studies/" in uri
        assert uri.endswith("/bulkdata/7FE00010")

        [frame] = client.retrieve_instance_frames(study, series, sop, frame_numbers=[1])
        assert frame == sent[0].PixelData
        [frame] = client.retrieve_instance_frames(study, series, sop, frame_numbers=[1],
                                                  media_types=("application/octet-stream",))
        assert frame == sent[0].PixelData

        # a body larger than the client's chunk size goes up with chunked transfer encoding
        client.set_chunk_size(16 * 1024)
        more = [dataset("MR_small.dcm", study=study, InstanceNumber=i + 1, PatientID="E2E-1")
                for i in range(4)]
        result = client.store_instances(datasets=more, study_instance_uid=study)
        assert len(result.ReferencedSOPSequence) == 4
        assert len(client.search_for_series(study_instance_uid=study)) == 5

        bundle = requests.get(f"{fhir_base}/ImagingStudy", params={"identifier": f"urn:oid:{study}"},
                              timeout=30).json()
        assert bundle["total"] == 1 if "total" in bundle else len(bundle["entry"]) == 1
        assert bundle["entry"][0]["resource"]["numberOfInstances"] == 7
