"""De-identify and re-identify FHIR files: JSON resources and Bundles, NDJSON, folders.

Used by ``synthport deidentify`` and ``synthport reidentify``. The output has the shape of
the input (a Bundle stays a Bundle, an NDJSON file stays NDJSON, a folder's layout is
kept); a file that fails is reported and skipped, the others go on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

from server.deid.fhir import DeidEngine, reidentify_resource
from server.errors import SynthportError

SUFFIXES = (".json", ".ndjson")


def _files(inputs: Iterable[str | os.PathLike]) -> Iterator[tuple[Path, Path, Path]]:
    """(file, path relative to the output folder, input root) of every FHIR file."""
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.name.endswith(SUFFIXES):
                    yield f, f.relative_to(p), p
        else:
            yield p, Path(p.name), p.parent


def _transform_file(src: Path, dst: Path, fn: Callable[[list[dict]], list[dict]]) -> int:
    if dst.resolve() == src.resolve():
        raise SynthportError(f"{src}: the output would overwrite the input")
    text = src.read_text(encoding="utf-8")
    if src.name.endswith(".ndjson"):
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SynthportError(f"{src}:{n}: not JSON ({exc.msg})") from None
        out = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fn(items))
        count = len(items)
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SynthportError(f"{src}: not JSON ({exc.msg})") from None
        out = json.dumps(fn([obj])[0], ensure_ascii=False, indent=2) + "\n"
        count = 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    tmp.write_text(out, encoding="utf-8")
    os.replace(tmp, dst)
    return count


def _run(inputs, out_dir, make_fn, report) -> tuple[int, int]:
    out_root = Path(out_dir)
    done = failed = 0
    for src, rel, root in _files(inputs):
        try:
            n = _transform_file(src, out_root / rel, make_fn(src, root))
            done += 1
            report(f"{src}: {n} resource(s) -> {out_root / rel}")
        except (SynthportError, OSError, UnicodeDecodeError) as exc:
            failed += 1
            report(f"{src}: {getattr(exc, 'message', None) or exc}")
    return done, failed


def deidentify_paths(inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                     engine: DeidEngine, report: Callable[[str], None] = lambda s: None
                     ) -> tuple[int, int]:
    """De-identify FHIR JSON/NDJSON files and folders into ``out_dir``.

    dateShiftScope ``file`` uses each file's name, ``folder`` the input folder's name.

    Returns:
        (files written, files failed).
    """
    def make(src: Path, root: Path):
        return lambda items: engine.apply_many(items, file=src.name, folder=str(root))
    return _run(inputs, out_dir, make, report)


def reidentify_paths(inputs: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                     key: bytes, report: Callable[[str], None] = lambda s: None,
                     contexts: tuple[str, ...] = ("value",)) -> tuple[int, int]:
    """Turn the pseudonyms of de-identified files back (with the pseudonym key).

    Returns:
        (files written, files failed).
    """
    def make(src: Path, root: Path):
        return lambda items: [reidentify_resource(r, key, contexts) for r in items]
    return _run(inputs, out_dir, make, report)
