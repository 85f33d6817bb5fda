"""Patient-level generator: an any-order autoregressive network (TabularARGN-style).

See docs/generators.md. ``PatientModel`` is the entry point; it is imported lazily
so that the encoders and the evaluation code work without torch.
"""
from generators.tabular.errors import ModelFileError, TabularModelError

__all__ = ["PatientModel", "TabularModelError", "ModelFileError"]


def __getattr__(name: str):
    if name == "PatientModel":
        from generators.tabular.model import PatientModel

        return PatientModel
    raise AttributeError(name)
