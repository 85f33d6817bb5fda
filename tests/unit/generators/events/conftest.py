"""One tiny event model, trained once per test session (seconds on 2 cores)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tables():
    from generators.events.synthetic import make_synthetic_tables

    return make_synthetic_tables(60, seed=7)


@pytest.fixture(scope="session")
def fitted(tables):
    import torch

    torch.set_num_threads(1)
    from generators.events import EventModel

    patients, events = tables
    model = EventModel(hidden=48, d_in=32).fit(patients, events, epochs=4, progress=False, seed=1)
    return model
