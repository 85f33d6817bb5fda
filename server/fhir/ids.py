"""Server-assigned resource ids: time-ordered UUIDs (version 7, RFC 9562 §5.7).

A create gets a new id from the server (FHIR R4 http §3.1.0.1.5). Random UUIDs (version
4) put every new resource, and every index row that points at one (a Provenance's
targets, the references to an Encounter created in the same Bundle), on a random page of
the id-keyed B-trees, so a transaction of a few hundred resources dirtied thousands of
pages. Version 7 UUIDs start with the creation time in milliseconds: new ids sort after
the old ones, and their rows land on the last pages of those indexes. They are still
74 random bits per millisecond, as unguessable as a version 4 id for practical purposes;
what they add is the creation time, which ``meta.lastUpdated`` of the first version shows
anyway.
"""
from __future__ import annotations

import os
import time
import uuid


def new_id() -> str:
    """A new resource id: a version 7 UUID in its canonical text form (36 characters,
    a valid FHIR id)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")          # 80 bits, 74 of them used
    value = (ms & 0xFFFF_FFFF_FFFF) << 80                  # unix_ts_ms: 48 bits
    value |= 0x7 << 76                                     # ver
    value |= (rand >> 68) << 64                            # rand_a: 12 bits
    value |= 0b10 << 62                                    # var (RFC 9562 §4.1)
    value |= rand & ((1 << 62) - 1)                        # rand_b: 62 bits
    return str(uuid.UUID(int=value))


__all__ = ["new_id"]
