"""MovieLens ``ml-latest-small`` ratings (100,004 ratings, 671 users, 9,066 movies), for federated
recommendation.

Source: the R package dslabs as Debian ships it (``r-cran-dslabs``): its data sets live in an R
lazy-load database, ``/usr/lib/R/site-library/dslabs/data/Rdata.rdx`` (the index: a gzip'd
R-serialised list ``variables: name -> (offset, length)``) and ``Rdata.rdb`` (the objects: each a
4-byte big-endian length, then zlib data holding one R-serialised object).  The ``movielens``
object is a data.frame (movieId, title, year, genres, userId, rating, timestamp) that PyPI
``rdata`` parses.  Nothing is downloaded and nothing is committed: the parse (~3 s) is cached as
plain arrays by :mod:`flotilla.data.cache` (milliseconds afterwards).

Arrays (ids made dense: users and movies numbered by their sorted original ids):
``user`` int32 [R], ``item`` int32 [R], ``rating`` float32 [R], ``timestamp`` int64 [R] (ratings in
the database's order); per movie ``movie_id`` int32 [M] (the original movieId), ``year`` int16 [M]
(0 = unknown), ``genres`` int8 [M, MAX_GENRES] (genre ids, -1 padding), ``title`` str [M]; and
``genre_names`` str [G].  The string ``(no genres listed)`` counts as a genre of its own, so every
movie has at least one.
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import DatasetMissingError, cached

DEFAULT_DB = Path("/usr/lib/R/site-library/dslabs/data/Rdata")  # + .rdb / .rdx
DB_ENV = "FLOTILLA_DSLABS"
OBJECT = "movielens"
# The sizes of dslabs 0.7.4's subset; the model's tables are sized by them, so a device builds the
# model without the data.  load_movielens() checks the parse against them.
NUM_RATINGS, NUM_USERS, NUM_MOVIES, NUM_GENRES = 100_004, 671, 9_066, 20
MAX_GENRES = 10  # most genres of one movie
_VERSION = "1"
_INSTALL = "sudo apt-get install r-cran-dslabs"


@dataclass(frozen=True)
class MovieLens:
    user: np.ndarray  # int32 [R], 0..NUM_USERS-1
    item: np.ndarray  # int32 [R], 0..NUM_MOVIES-1
    rating: np.ndarray  # float32 [R], 0.5..5 in steps of 0.5
    timestamp: np.ndarray  # int64 [R], seconds since 1970
    movie_id: np.ndarray  # int32 [M]
    year: np.ndarray  # int16 [M], 0 = unknown
    genres: np.ndarray  # int8 [M, MAX_GENRES], -1 = padding
    title: np.ndarray  # str [M]
    genre_names: np.ndarray  # str [G]

    @property
    def num_ratings(self) -> int:
        return len(self.rating)


def database(path: str | Path | None = None) -> Path:
    """The lazy-load database's path without extension: ``path``, else ``$FLOTILLA_DSLABS``, else Debian's."""
    db = Path(path or os.environ.get(DB_ENV) or DEFAULT_DB)
    return db.with_suffix("") if db.suffix in (".rdb", ".rdx") else db


def read_r_object(db: Path, name: str):
    """One object of an R lazy-load database, converted by ``rdata`` (a data.frame -> pandas)."""
    try:
        import rdata
    except ImportError:
        raise DatasetMissingError("reading MovieLens needs PyPI rdata: `pip install 'flotilla[movielens]'`") from None
    warnings.filterwarnings("ignore", message="Unknown file type", module="rdata")  # the index has no RDS magic
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(db.with_suffix(".rdx").read_bytes())))
    if name not in index["variables"]:
        raise DatasetMissingError(f"{db}.rdx holds no object {name!r}: reinstall it with `{_INSTALL}`")
    offset, length = (int(v) for v in index["variables"][name])
    with open(db.with_suffix(".rdb"), "rb") as f:
        f.seek(offset)
        blob = f.read(length)
    size = struct.unpack(">I", blob[:4])[0]
    data = zlib.decompress(blob[4:])
    if len(data) != size:
        raise ValueError(f"{db}.rdb: object {name!r} is {len(data)} bytes, its header says {size}")
    return rdata.conversion.convert(rdata.parser.parse_data(data))


def parse_movielens(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """Read and convert the ``movielens`` data.frame (no cache): the arrays of :class:`MovieLens`."""
    db = database(path)
    missing = [p.name for p in (db.with_suffix(".rdb"), db.with_suffix(".rdx")) if not p.is_file()]
    if missing:
        raise DatasetMissingError(
            f"MovieLens not found at {db}.rdb/.rdx (missing {', '.join(missing)}): install it with `{_INSTALL}`, "
            f"or set task.path (or ${DB_ENV}) to a dslabs data/Rdata database"
        )
    df = read_r_object(db, OBJECT)
    movie_ids, item = np.unique(df["movieId"].to_numpy(dtype=np.int64), return_inverse=True)
    user_ids, user = np.unique(df["userId"].to_numpy(dtype=np.int64), return_inverse=True)
    first = np.unique(item, return_index=True)[1]  # one row per movie, for its title / year / genres
    genre_strings = df["genres"].astype(str).to_numpy()[first]
    genre_names = sorted({g for s in genre_strings for g in s.split("|")})
    code = {g: i for i, g in enumerate(genre_names)}
    genres = np.full((len(movie_ids), MAX_GENRES), -1, dtype=np.int8)
    for m, s in enumerate(genre_strings):
        ids = [code[g] for g in s.split("|")]
        genres[m, : len(ids)] = ids
    year = df["year"].to_numpy(dtype=np.float64, na_value=0)[first].astype(np.int16)
    return {
        "user": user.astype(np.int32),
        "item": item.astype(np.int32),
        "rating": df["rating"].to_numpy(dtype=np.float32),
        "timestamp": df["timestamp"].to_numpy(dtype=np.int64),
        "movie_id": movie_ids.astype(np.int32),
        "year": year,
        "genres": genres,
        "title": df["title"].astype(str).to_numpy()[first].astype(str),
        "genre_names": np.array(genre_names),
    }


def load_movielens(path: str | Path | None = None) -> MovieLens:
    """The parsed ratings (from the cache after the first call), checked against the known sizes."""
    db = database(path)
    arrays = cached("movielens", _VERSION, {"db": str(db.resolve())}, lambda: parse_movielens(db))
    data = MovieLens(**arrays)
    sizes = (data.num_ratings, len(np.unique(data.user)), len(data.movie_id), len(data.genre_names))
    if sizes != (NUM_RATINGS, NUM_USERS, NUM_MOVIES, NUM_GENRES):
        raise DatasetMissingError(
            f"{db}: expected dslabs' MovieLens subset ({NUM_RATINGS} ratings, {NUM_USERS} users, {NUM_MOVIES} "
            f"movies, {NUM_GENRES} genres), found {sizes}; install r-cran-dslabs 0.7.4 with `{_INSTALL}`"
        )
    return data
