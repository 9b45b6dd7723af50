"""A report download from the admin: a ZIP holding the CSV and its manifest, streamed."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

from evidence.reports import Export


class _Sink(io.RawIOBase):
    """A write-only stream whose bytes are handed on as they come (zipfile writes to it)."""

    def __init__(self):
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def zip_stream(export: Export, basename: str) -> Iterator[bytes]:
    """Stream `basename.csv` then `basename.manifest.json` in one ZIP, with flat memory."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open(f"{basename}.csv", "w", force_zip64=True) as member:
            for chunk in export.chunks():
                member.write(chunk)
                yield sink.take()
        archive.writestr(f"{basename}.manifest.json", export.manifest_json())
    yield sink.take()
