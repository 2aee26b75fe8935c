"""`tiger download`: fetch the original McAuley 2014 files of one category.

Files are streamed to a temporary name beside the destination and renamed only when complete
(and, when the server sends a Content-Length, only when every byte arrived), so an interrupted
download never looks like a finished one. A file already present is therefore complete and is
skipped unless ``force``.
"""

from __future__ import annotations

import http.client
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from tiger_ray import atomic
from tiger_ray.data.mcauley import file_names

log = logging.getLogger(__name__)

BASE_URL = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60.0


class DownloadError(OSError):
    """The server refused, failed or cut off a download."""


def download_file(url: str, dest: str | os.PathLike, timeout: float = TIMEOUT_SECONDS) -> Path:
    """Stream ``url`` to ``dest`` atomically, with a progress bar; returns ``dest``."""
    dest = Path(dest)
    request = urllib.request.Request(url, headers={"User-Agent": "tiger-ray"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, \
                atomic.atomic_path(dest) as tmp:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                              desc=dest.name, leave=False) as bar:
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise DownloadError(f"{url}: connection closed after {received:,} of "
                                    f"{total:,} bytes; nothing was written, try again")
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise DownloadError(f"{url}: cannot connect ({err.reason})") from None
    except TimeoutError:
        raise DownloadError(f"{url}: no answer within {timeout:g} s") from None
    except (ConnectionError, http.client.HTTPException) as err:
        raise DownloadError(f"{url}: connection failed ({type(err).__name__}: {err})") from None
    return dest


def download_mcauley(dataset: str, out: str | os.PathLike, base_url: str | None = None,
                     force: bool = False) -> list[Path]:
    """Download the reviews (5-core) and meta files of ``dataset`` into ``out``."""
    base = (base_url or BASE_URL).rstrip("/") + "/"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in file_names(dataset):
        dest = out / name
        if dest.exists() and not force:
            log.info("%s already present, skipping (use --force to download again)", dest)
        else:
            log.info("downloading %s%s", base, name)
            download_file(base + name, dest)
        paths.append(dest)
    return paths
