"""Synthetic cohorts (issue 5, server side): model registry, training, cohort index,
and the FHIR / DICOM sources that generate virtual patients on demand.

See docs/synthetic.md. Nothing here imports Flask; the routes are in
``server/http/admin.py`` and ``server/http/synthetic.py``.
"""
