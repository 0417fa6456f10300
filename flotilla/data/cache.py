"""On-disk cache for parsed data sets.

Parsing the raw sources (gzip'd IDX files, Markdown plays) takes seconds; loading the parsed
arrays back takes milliseconds.  Each cache entry is one uncompressed ``.npz`` file named by
data set, a parser version string and a hash of the parse parameters, so changing the parser
(bump the version) or the parameters never reads a stale entry.  Entries are written to a
temporary file and moved into place with ``os.replace``, so concurrent processes never see a
half-written file.

The cache directory is ``$FLOTILLA_CACHE`` if set, else ``~/.cache/flotilla``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

Arrays = dict[str, np.ndarray]


class DatasetMissingError(Exception):
    """The raw files of a data set are not on this machine; the message says how to install them."""


def cache_dir() -> Path:
    return Path(os.environ.get("FLOTILLA_CACHE") or Path.home() / ".cache" / "flotilla")


def cache_path(dataset: str, version: str, params: Mapping[str, object] | None = None) -> Path:
    """Where the entry for ``dataset`` parsed by parser ``version`` with ``params`` lives."""
    blob = json.dumps(dict(params or {}), sort_keys=True, default=str)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:12]
    return cache_dir() / f"{dataset}-{version}-{digest}.npz"


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # Uncompressed: loading is then a plain read, far faster than zlib.
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared by users of the machine
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _remove_stale_temps(path)


STALE_TEMP_S = 600  # a writer killed mid-write (kill -9) leaves its temp file; a live one finishes long before


def _remove_stale_temps(path: Path) -> None:
    """Remove temp files of this entry left by writers that were killed (tens of MB each)."""
    now = time.time()
    for old in path.parent.glob(path.name + ".*.tmp"):
        try:
            if now - old.stat().st_mtime > STALE_TEMP_S:
                old.unlink()
        except OSError:
            pass  # another process removed it first


def load_arrays(path: Path) -> Arrays | None:
    """The arrays saved at ``path``, or ``None`` if the entry is absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (FileNotFoundError, zipfile.BadZipFile, ValueError, OSError, EOFError):
        return None


def cached(
    dataset: str,
    version: str,
    params: Mapping[str, object],
    build: Callable[[], Mapping[str, np.ndarray]],
) -> Arrays:
    """Load the entry for (dataset, version, params), building and saving it on a miss."""
    path = cache_path(dataset, version, params)
    arrays = load_arrays(path)
    if arrays is None:
        arrays = dict(build())
        try:
            save_arrays(path, arrays)
        except OSError:
            pass  # a read-only or full disk only costs a re-parse next time
    return arrays
