"""synthport server: FHIR R4 REST, DICOMweb, DIMSE over real and synthetic sources."""
