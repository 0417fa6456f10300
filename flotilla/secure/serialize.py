"""An explicit, strict JSON encoding of the protocol messages (flotilla.secure.messages) for untrusted
transports: no pickle, no classes named by the input.  Bytes travel as base64 strings, ``dict[int, ...]``
keys as decimal strings, pairs as 2-lists, sets as sorted lists, ring vectors as
``{"dtype": "uint32"|"uint64", "b64": ...}`` (little-endian), or with ``raw`` (:func:`dumps_raw`) as
``{"dtype": ..., "bits": r}`` with the vector's bytes beside the JSON, ``r`` bits per element packed
(:mod:`flotilla.secure.packing`): no base64 (1.33x the bytes) and no text to scan.

``loads(obj, cls)`` checks every field's type and rejects extra or missing keys with
:class:`~flotilla.secure.errors.ProtocolError`; semantic checks stay with the state machines.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import fields
from typing import Any

import numpy as np

from flotilla.secure import packing
from flotilla.secure.errors import ProtocolError
from flotilla.secure.messages import (
    AdvertiseKeys,
    KeyDirectory,
    MaskedInput,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)

MAX_ID = 1 << 31

# field -> kind: b bytes, i id, Db dict[id, bytes], Dp dict[id, (bytes, bytes)], S set of ids, V ring vector
_KINDS: dict[type, dict[str, str]] = {
    AdvertiseKeys: {"session": "b", "sender": "i", "c_pk": "b", "s_pk": "b"},
    KeyDirectory: {"session": "b", "keys": "Dp"},
    ShareKeys: {"session": "b", "sender": "i", "ciphertexts": "Db", "commitments": "Dp", "b_commitment": "b"},
    ShareBundle: {"session": "b", "recipient": "i", "ciphertexts": "Db"},
    MaskedInput: {"session": "b", "sender": "i", "y": "V"},
    UnmaskRequest: {"session": "b", "survivors": "S"},
    UnmaskResponse: {"session": "b", "sender": "i", "b_shares": "Dp", "s_shares": "Dp"},
}
for _cls, _k in _KINDS.items():  # the table names every field of every message
    assert set(_k) == {f.name for f in fields(_cls)}, _cls


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def dumps(msg) -> dict[str, Any]:
    """A JSON-able dict of a protocol message."""
    kinds = _KINDS.get(type(msg))
    if kinds is None:
        raise TypeError(f"not a secure-aggregation message: {type(msg).__name__}")
    out: dict[str, Any] = {}
    for name, kind in kinds.items():
        v = getattr(msg, name)
        if kind == "b":
            out[name] = _b64(v)
        elif kind == "i":
            out[name] = int(v)
        elif kind == "Db":
            out[name] = {str(int(k)): _b64(x) for k, x in v.items()}
        elif kind == "Dp":
            out[name] = {str(int(k)): [_b64(x), _b64(y)] for k, (x, y) in v.items()}
        elif kind == "S":
            out[name] = sorted(int(x) for x in v)
        else:  # V
            out[name] = {
                "dtype": str(v.dtype),
                "b64": _b64(np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<")).tobytes()),
            }
    return out


def dumps_raw(msg, bits: int) -> tuple[dict[str, Any], bytes | memoryview]:
    """``(JSON-able dict, raw bytes)`` of a message with a ring vector (MaskedInput): the vector as
    ``bits``-bit packed little-endian bytes outside the JSON."""
    vec = [name for name, kind in _KINDS.get(type(msg), {}).items() if kind == "V"]
    if len(vec) != 1:
        raise TypeError(f"not a secure-aggregation message with a ring vector: {type(msg).__name__}")
    v = getattr(msg, vec[0])
    out = dumps(type(msg)(**{**{f.name: getattr(msg, f.name) for f in fields(msg)}, vec[0]: v[:0]}))
    out[vec[0]] = {"dtype": str(v.dtype), "bits": int(bits)}
    return out, packing.pack(v, bits)


def _err(cls, name: str, why: str) -> ProtocolError:
    return ProtocolError(f"{cls.__name__}.{name}: {why}")


def _bytes(cls, name, v, limit: int) -> bytes:
    if not isinstance(v, str) or len(v) > 4 * limit // 3 + 4:
        raise _err(cls, name, "expected a base64 string")
    try:
        return base64.b64decode(v.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise _err(cls, name, "invalid base64") from None


def _id(cls, name, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < MAX_ID:
        raise _err(cls, name, f"expected a client id (int in [0, 2^31)), got {type(v).__name__}")
    return v


def _key(cls, name, k) -> int:
    if not isinstance(k, str) or not k.isdigit() or len(k) > 10:
        raise _err(cls, name, "keys must be decimal client ids")
    return _id(cls, name, int(k))


def loads(
    obj: Any,
    cls: type,
    *,
    max_bytes: int = 1 << 16,
    length: int | None = None,
    raw: bytes | None = None,
    bits: int | None = None,
):
    """The message of type ``cls`` encoded in ``obj`` (from json.loads of untrusted input).
    ``max_bytes`` bounds each bytes field; ``length`` is the ring vector length MaskedInput must have.
    ``raw``: the bytes of a ring vector sent beside the JSON (:func:`dumps_raw`), which must be
    ``length`` elements of exactly ``bits`` bits (the round's ring)."""
    kinds = _KINDS.get(cls)
    if kinds is None:
        raise TypeError(f"not a secure-aggregation message class: {cls!r}")
    if not isinstance(obj, dict) or set(obj) != set(kinds):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ProtocolError(f"{cls.__name__}: expected the fields {sorted(kinds)}, got {got}")
    vals: dict[str, Any] = {}
    for name, kind in kinds.items():
        v = obj[name]
        if kind == "b":
            vals[name] = _bytes(cls, name, v, max_bytes)
        elif kind == "i":
            vals[name] = _id(cls, name, v)
        elif kind in ("Db", "Dp"):
            if not isinstance(v, dict):
                raise _err(cls, name, "expected an object")
            d = {}
            for k, x in v.items():
                if kind == "Db":
                    d[_key(cls, name, k)] = _bytes(cls, name, x, max_bytes)
                else:
                    if not isinstance(x, list) or len(x) != 2:
                        raise _err(cls, name, "expected pairs")
                    d[_key(cls, name, k)] = (_bytes(cls, name, x[0], max_bytes), _bytes(cls, name, x[1], max_bytes))
            vals[name] = d
        elif kind == "S":
            if not isinstance(v, list):
                raise _err(cls, name, "expected a list of client ids")
            vals[name] = frozenset(_id(cls, name, x) for x in v)
        elif raw is not None:  # V, its bytes beside the JSON
            dt = np.dtype(packing.container(bits)) if bits is not None else None
            if not isinstance(v, dict) or set(v) != {"dtype", "bits"} or dt is None or v["dtype"] != str(dt):
                raise _err(cls, name, f"expected {{dtype: {dt}, bits: {bits}}} with the vector's raw bytes")
            if v["bits"] != bits or length is None:
                raise _err(cls, name, f"this round's ring has {bits} bits per element, got {v['bits']!r}")
            try:
                vals[name] = packing.unpack(raw, length, bits)
            except ValueError as e:
                raise _err(cls, name, str(e)) from None
        else:  # V
            if not isinstance(v, dict) or set(v) != {"dtype", "b64"} or v["dtype"] not in ("uint32", "uint64"):
                raise _err(cls, name, "expected {dtype: uint32|uint64, b64}")
            dt = np.dtype(v["dtype"]).newbyteorder("<")
            limit = (length or (max_bytes // dt.itemsize)) * dt.itemsize
            raw = _bytes(cls, name, v["b64"], limit)
            if len(raw) % dt.itemsize or (length is not None and len(raw) != length * dt.itemsize):
                raise _err(cls, name, f"expected {length} elements of {v['dtype']}")
            vals[name] = np.frombuffer(raw, dtype=dt).astype(np.dtype(v["dtype"]))
    return cls(**vals)
