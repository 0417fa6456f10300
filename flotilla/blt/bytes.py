"""Byte symbols as BLT numbers them: 4 specials, then the 256 byte values offset by 4 (260 symbols)."""

from __future__ import annotations

import numpy as np
import torch

BOE, BOS, EOS, BPE = 0, 1, 2, 3  # beginning of example (also the hash padding), begin/end of sequence, BPE delimiter
OFFSET = 4
VOCAB_SIZE = 256 + OFFSET


def encode(text: str | bytes, bos: bool = False, eos: bool = False) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as symbols (byte + 4), optionally framed by BOS / EOS; int64 [n]."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64) + OFFSET
    parts = ([np.array([BOS])] if bos else []) + [ids] + ([np.array([EOS])] if eos else [])
    return torch.from_numpy(np.concatenate(parts))


def decode(ids) -> str:
    """Symbols back to text: specials are dropped, invalid UTF-8 becomes U+FFFD."""
    arr = np.asarray(torch.as_tensor(ids).cpu(), dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
        raise ValueError(f"symbols must lie in 0..{VOCAB_SIZE - 1}, got {arr.min()}..{arr.max()}")
    data = (arr[arr >= OFFSET] - OFFSET).astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")
