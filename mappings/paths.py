"""A small, fast subset of FHIRPath for mapping specifications.

Supported: dotted element names (``period.start``), implicit flattening of lists
(``code.coding.code`` visits every coding, as FHIRPath does, FHIR R4 FHIRPath §5.1)
and an equality filter ``where(name='literal')`` (``identifier.where(system='urn:dicom:uid').value``).
That is all a mapping needs, and unlike a full FHIRPath engine it costs a few dict
look-ups per resource, which matters at hundreds of thousands of resources.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Callable

_TOKEN = re.compile(r"(?:where\(\s*([A-Za-z_]\w*)\s*=\s*'([^']*)'\s*\)|([A-Za-z_]\w*))")


def parse_path(path: str) -> list[tuple[str, str | None]]:
    """Split a path into steps: ``(name, None)`` for an element, ``(name, literal)`` for a filter.

    Raises:
        ValueError: the path is not in the supported subset.
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError("empty path")
    steps: list[tuple[str, str | None]] = []
    pos, text = 0, path.strip()
    while pos < len(text):
        if steps:
            if text[pos] != ".":
                raise ValueError(f"expected '.' at position {pos} of {path!r}")
            pos += 1
        m = _TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"cannot parse {path!r} at position {pos} "
                             "(supported: a.b.c and where(name='value'))")
        if m.group(3):
            steps.append((m.group(3), None))
        else:
            steps.append((m.group(1), m.group(2)))
        pos = m.end()
    return steps


@lru_cache(maxsize=None)
def compile_path(path: str) -> Callable[[Any], list]:
    """A function returning every value that ``path`` selects in a JSON object (possibly [])."""
    steps = parse_path(path)

    def run(obj: Any) -> list:
        cur = [obj]
        for name, literal in steps:
            nxt: list = []
            if literal is None:
                for o in cur:
                    if isinstance(o, dict):
                        v = o.get(name)
                        if v is None:
                            continue
                        if isinstance(v, list):
                            nxt.extend(v)
                        else:
                            nxt.append(v)
            else:
                for o in cur:
                    if isinstance(o, dict) and str(o.get(name)) == literal:
                        nxt.append(o)
            if not nxt:
                return nxt
            cur = nxt
        return cur

    # Fast path for the common single-element case.
    if len(steps) == 1 and steps[0][1] is None:
        name = steps[0][0]

        def run1(obj: Any) -> list:
            v = obj.get(name) if isinstance(obj, dict) else None
            if v is None:
                return []
            return v if isinstance(v, list) else [v]

        return run1
    return run


@lru_cache(maxsize=None)
def compile_first(path: str) -> Callable[[Any], Any]:
    """A function returning the first value ``path`` selects, or None (no list is built
    for the common one-element path)."""
    steps = parse_path(path)
    if len(steps) == 1 and steps[0][1] is None:
        name = steps[0][0]

        def one(obj: Any) -> Any:
            v = obj.get(name) if isinstance(obj, dict) else None
            if isinstance(v, list):
                return v[0] if v else None
            return v

        return one
    full = compile_path(path)

    def many(obj: Any) -> Any:
        vals = full(obj)
        return vals[0] if vals else None

    return many


def first(paths: list[str] | tuple[str, ...], obj: Any) -> Any:
    """The first value found by trying ``paths`` in order, or None."""
    for p in paths:
        vals = compile_path(p)(obj)
        if vals:
            return vals[0]
    return None
