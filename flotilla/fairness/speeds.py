"""Tier speed multipliers from a real distribution: R benchmark timings of real machines.

Debian ``r-cran-benchmarkmedata`` (GPL-2) ships ``past_results``: crowd-sourced timings of the
``benchmarkme`` R benchmarks, 1,976 machines.  Rule used here (stated in docs/fleet.md):

* a machine's time = the median of its ``prog`` test-group timings (the single-threaded
  programming benchmark: loops, recursion, sorting; 1,736 machines have one); speed = 1 / time;
* tiers = the terciles of speed (slowest third = low);
* multiplier of a tier = (median speed of the tier) / (median speed of the high tier), so high = 1.

The data is read from the installed package (an R lazy-load database: the ``.rdx`` index is
gzip-compressed, each object in ``.rdb`` a 4-byte length then zlib data) with PyPI ``rdata``.
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

BENCHMARKME_DIR = Path("/usr/lib/R/site-library/benchmarkmeData/data")
_INSTALL = "apt-get install r-cran-benchmarkmedata (and pip install rdata)"


def _read_object(folder: Path, name: str):
    import rdata

    with warnings.catch_warnings():  # rdata warns about R classes it maps by hand (Date, tbl_df)
        warnings.simplefilter("ignore")
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((folder / "Rdata.rdx").read_bytes())))
        offset, length = (int(v) for v in index["variables"][name])
        with open(folder / "Rdata.rdb", "rb") as f:
            f.seek(offset)
            blob = f.read(length)
        return rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))


@lru_cache(maxsize=2)
def machine_times(folder: str | Path = BENCHMARKME_DIR, test_group: str = "prog") -> np.ndarray:
    """Seconds per machine for ``test_group`` (median over a machine's repeated results)."""
    folder = Path(folder)
    if not (folder / "Rdata.rdx").exists():
        raise FileNotFoundError(f"tiers.speed: benchmarkme data not found at {folder}: {_INSTALL}")
    try:
        df = _read_object(folder, "past_results")
    except ImportError:
        raise ImportError(f"tiers.speed: benchmarkme needs the rdata package: {_INSTALL}") from None
    rows = df[df["test_group"] == test_group]
    times = rows.groupby("id")["time"].median().to_numpy(dtype=np.float64)
    return times[np.isfinite(times) & (times > 0)]


def tercile_multipliers(times: np.ndarray) -> tuple[float, float, float]:
    """(low, mid, high) speed multipliers: each speed tercile's median speed / the high tercile's."""
    speed = np.sort(1.0 / np.asarray(times, dtype=np.float64))
    if len(speed) < 3:
        raise ValueError("need at least 3 machines to form terciles")
    thirds = np.array_split(speed, 3)  # slowest third first
    med = [float(np.median(t)) for t in thirds]
    return med[0] / med[2], med[1] / med[2], 1.0


def benchmarkme_multipliers(folder: str | Path = BENCHMARKME_DIR) -> tuple[float, float, float]:
    return tercile_multipliers(machine_times(str(folder)))
