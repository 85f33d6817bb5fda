"""DICOM DIMSE (C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE) over a :class:`DicomSource`.

``handlers`` holds the pynetdicom event handlers (plain functions, bound in one
list by :func:`server.dimse.handlers.bind`); ``server`` builds the AE and runs the
listener (:func:`server.dimse.server.start_dimse`), in-process or as the child
process that ``synthport serve`` starts.
"""
