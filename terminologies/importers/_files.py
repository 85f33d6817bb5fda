"""Locating release files in a folder or a zip (not public API)."""
from __future__ import annotations

import io
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from ..errors import InvalidRequest


class Release:
    """A release folder, a zip, or a single file, searched by file-name pattern."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InvalidRequest(f"{self.path} does not exist")
        self._zip = zipfile.is_zipfile(self.path) if self.path.is_file() else False

    def names(self) -> list[str]:
        """Every file, as a relative path with '/' separators, sorted."""
        if self._zip:
            with zipfile.ZipFile(self.path) as z:
                return sorted(n for n in z.namelist() if not n.endswith("/"))
        if self.path.is_file():
            return [self.path.name]
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())

    def find(self, pattern: str) -> list[str]:
        """Files whose base name matches ``pattern`` (a regex, full match)."""
        rx = re.compile(pattern)
        return [n for n in self.names() if rx.fullmatch(n.rsplit("/", 1)[-1])]

    @contextmanager
    def open_text(self, name: str, encoding: str = "utf-8-sig") -> Iterator[IO[str]]:
        """Open one file as text (newline handling left to csv)."""
        if self._zip:
            with zipfile.ZipFile(self.path) as z, z.open(name) as raw:
                yield io.TextIOWrapper(raw, encoding=encoding, newline="")
        elif self.path.is_file():
            with open(self.path, encoding=encoding, newline="") as f:
                yield f
        else:
            with open(self.path / name, encoding=encoding, newline="") as f:
                yield f

    @contextmanager
    def open_binary(self, name: str) -> Iterator[IO[bytes]]:
        """Open one file as bytes."""
        if self._zip:
            with zipfile.ZipFile(self.path) as z, z.open(name) as raw:
                yield raw
        elif self.path.is_file():
            with open(self.path, "rb") as f:
                yield f
        else:
            with open(self.path / name, "rb") as f:
                yield f
