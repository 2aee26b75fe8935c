"""Line-by-line reading of input files (plain or gzip) with a progress bar and file:line errors."""

from __future__ import annotations

import gzip
import io
import os
import zlib
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm


def open_text(path: str | os.PathLike) -> io.TextIOBase:
    """Open a UTF-8 text file; ``.gz`` files are decompressed on the fly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "rt", encoding="utf-8")


def iter_lines(path: str | os.PathLike, desc: str | None = None,
               progress: bool = True) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without trailing newline) for non-blank lines.

    The progress bar counts compressed bytes read, so it has a true total even for ``.gz`` files.
    ``progress=False`` for readers in Ray workers, where a bar would only clutter the driver's log.
    """
    path = Path(path)
    total = path.stat().st_size if path.is_file() else None
    with open_text(path) as handle, tqdm(total=total, unit="B", unit_scale=True,
                                         desc=desc or path.name, leave=False,
                                         disable=not progress or None) as bar:
        raw = _raw_file(handle)
        position, lineno = 0, 0
        try:
            for lineno, line in enumerate(handle, start=1):
                if lineno % 4096 == 0:
                    position = _bytes_read(raw, position)
                    bar.n = position
                    bar.refresh()
                line = line.rstrip("\r\n")
                if line.strip():
                    yield lineno, line
        except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, zlib.error) as err:
            # A corrupt or truncated file, or not UTF-8 text. Text is decoded in chunks, so the
            # damage is somewhere after the last line we got, not necessarily on the next one.
            raise ValueError(f"{path}: cannot be read after line {lineno} "
                             f"({type(err).__name__}: {err})") from None


def _raw_file(handle):
    # The on-disk file under the text layer (and under gzip), whose offset is bytes consumed.
    buffer = handle.buffer
    return getattr(buffer, "fileobj", None) or buffer


def _bytes_read(raw, fallback: int) -> int:
    try:
        return int(raw.tell())
    except (AttributeError, OSError, ValueError):
        return fallback


def where(path: str | os.PathLike, lineno: int) -> str:
    """The ``path:line`` prefix every input error starts with."""
    return f"{path}:{lineno}"
