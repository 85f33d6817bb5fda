"""Patient-level generator: an any-order autoregressive network (TabularARGN-style).

See docs/generators.md. ``PatientModel`` is the entry point; it is imported lazily
so that the encoders and the evaluation code work without torch. ``CtganPatientModel``
(``generators.tabular.ctgan_backend``) is the optional CTGAN backend (training needs the
extra ``synthport[ctgan]``, BUSL-1.1); :func:`load_patient_model` loads a saved model of
either kind by the ``format`` of its ``model.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

from generators.tabular.errors import ModelFileError, TabularModelError

__all__ = ["PatientModel", "CtganPatientModel", "TabularModelError", "ModelFileError",
           "load_patient_model", "CTGAN_LICENCE"]

#: Printed (and stored with the model) whenever CTGAN is the patient-level backend.
CTGAN_LICENCE = (
    "CTGAN (the ctgan package) is licensed under the Business Source License 1.1: its "
    "use grant excludes offering 'a Synthetic Data Creation Service' (a commercial service "
    "that lets third parties benefit from synthetic data features). Check that your use "
    "is allowed before serving cohorts from this model commercially.")


def load_patient_model(path: str | Path):
    """The patient model saved in folder ``path``: a ``PatientModel`` (argn) or a
    ``CtganPatientModel``, by ``model.json``'s ``format``. Nothing is unpickled.

    Raises:
        ModelFileError: the folder or its ``model.json`` cannot be read.
    """
    path = Path(path)
    try:
        fmt = json.loads((path / "model.json").read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"cannot read model folder {path}: {exc}") from exc
    if fmt == "synthport-tabular-ctgan":
        from generators.tabular.ctgan_backend import CtganPatientModel

        return CtganPatientModel.load(path)
    from generators.tabular.model import PatientModel

    return PatientModel.load(path)


def __getattr__(name: str):
    if name == "PatientModel":
        from generators.tabular.model import PatientModel

        return PatientModel
    if name == "CtganPatientModel":
        from generators.tabular.ctgan_backend import CtganPatientModel

        return CtganPatientModel
    raise AttributeError(name)
