"""Synthetic images: a conditional image model and DICOM rendering (issue 5).

* :mod:`.data`: training arrays from DICOM (``collect_images``, ``sample_dicom_paths``).
* :mod:`.model`: ``ImageModel`` (conditional VAE, fit/sample/save/load) and
  ``seed_from_uid``.
* :mod:`.procedural`: the fallback for modalities without training images.
* :mod:`.render`: arrays to DICOM instances (``render_instance``, ``render_series``,
  ``instance_bytes``, ``series_bytes``).
* :mod:`.quality`: ``image_report``: quality proxies and exact-copy check per class.
* :mod:`.synth`: ``synthesize_series``: sample (seeded by the UIDs) and render a series.

torch is imported lazily, so rendering and the procedural fallback work without it.
"""
from .data import CollectedImages, collect_images, sample_dicom_paths
from .model import ImageModel, ImageModelError, seed_from_uid
from .render import RenderError, instance_bytes, render_instance, render_series, series_bytes
from .synth import instance_uids, synthesize_series

__all__ = ["CollectedImages", "collect_images", "sample_dicom_paths", "ImageModel",
           "ImageModelError", "seed_from_uid", "RenderError", "instance_bytes",
           "render_instance", "render_series", "series_bytes", "instance_uids",
           "synthesize_series"]
