"""DICOM behind every interface: the source protocol, the real store, DICOMweb logic.

* :mod:`server.dicom.source`: :class:`DicomSource` (what DICOMweb and DIMSE talk to),
  :class:`StoreOutcome`, :class:`InstanceRef`;
* :mod:`server.dicom.store`: :class:`DicomStore`, the real source (blob files + SQL,
  linked to FHIR Patient/ImagingStudy);
* :mod:`server.dicom.attributes`, :mod:`server.dicom.matching`: the query-key catalogue
  and DICOM matching rules (SQL and in-memory);
* :mod:`server.dicom.dicomjson`, :mod:`server.dicom.pixels`, :mod:`server.dicom.multipart`,
  :mod:`server.dicom.web`: PS3.18 DICOM JSON, frames/rendering, multipart bodies and the
  DICOMweb transactions (no Flask);
* :mod:`server.dicom.fhirlink`: the FHIR resources that mirror stored studies.
"""
