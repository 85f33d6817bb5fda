"""Fixtures for the terminology tests."""
from __future__ import annotations

import pytest

from terminologies.operations import valueset_expand
from terminologies.provider import InMemoryProvider

from ._data import CM_SCT_ICD, ICD_CS, VS_DIABETES, VS_ENDOCRINE_NO_T1, VS_MIXED, diabetes_cs


@pytest.fixture(autouse=True)
def _fresh_caches():
    valueset_expand.clear_cache()
    yield
    valueset_expand.clear_cache()


@pytest.fixture
def provider() -> InMemoryProvider:
    return InMemoryProvider(diabetes_cs(), ICD_CS, VS_DIABETES, VS_ENDOCRINE_NO_T1, VS_MIXED, CM_SCT_ICD)

