"""One call from a series description to its synthetic DICOM instances.

This is the contract between the image model and a synthetic cohort's DICOM source:
the pixels of a series are a pure function of (model, modality, body part, UIDs).

* cross-sectional series (CT, MR, PT, NM): one volume seeded by the Series Instance UID
  (``ImageModel.sample_series``), so the slices are coherent; always generated whole, so
  one instance fetched alone is byte-identical to the same instance of the whole series;
* everything else: each instance seeded by its own SOP Instance UID (``sample``, n=1).
"""
from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset

from .data import norm_modality
from .model import ImageModel, seed_from_uid
from .render import derived_uid, render_instance, render_series

VOLUME_MODALITIES = {"CT", "MR", "PT", "NM"}


def instance_uids(series_uid: str, n: int, first: int = 1) -> list[str]:
    """The SOP Instance UIDs ``render_series`` derives for a series without given UIDs."""
    return [derived_uid(series_uid, "instance", str(first + i)) for i in range(n)]


def synthesize_series(model: ImageModel, attrs: dict[str, Any], n_instances: int = 1,
                      matrix: tuple[int, int] | None = None) -> list[Dataset]:
    """Sample and render a whole series.

    Args:
        model: the cohort's image model (an unfitted one gives the procedural fallback).
        attrs: as for :func:`render_instance`, without SOPInstanceUID; give
            ``SOPInstanceUIDs`` (one per instance) or let them be derived.
        n_instances: number of slices or images.
        matrix: (rows, columns); the modality's usual matrix by default.

    Returns:
        The instances, numbered from ``attrs.get("InstanceNumber", 1)``.
    """
    modality = norm_modality(attrs.get("Modality"))
    body_part = str(attrs.get("BodyPartExamined") or "")
    series_uid = str(attrs["SeriesInstanceUID"])
    first = int(attrs.get("InstanceNumber", 1) or 1)
    uids = [str(u) for u in attrs.get("SOPInstanceUIDs") or instance_uids(series_uid, n_instances,
                                                                         first)]
    if modality in VOLUME_MODALITIES:
        arrays = model.sample_series(modality, body_part, seed_from_uid(series_uid), n_instances)
    else:
        arrays = [model.sample(modality, body_part, seed_from_uid(uid))[0] for uid in uids]
    if len(uids) == 1:
        return [render_instance(arrays[0], {**attrs, "InstanceNumber": first,
                                            "SOPInstanceUID": uids[0]}, matrix)]
    return render_series(arrays, {**attrs, "SOPInstanceUIDs": uids}, matrix)
