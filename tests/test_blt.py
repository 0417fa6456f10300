"""BLT pieces (issue 17): bytes, hash n-grams, patcher invariants, causality through patching,
bits per byte, memorisation, the entropy model's checkpoint, and the shakespeare-bytes task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from flotilla.blt import bytes as B
from flotilla.blt.entropy import Adam, EntropySpec, load_entropy_model, train_entropy_model
from flotilla.blt.hashing import BASE, HashEmbeddings, ngram_hash
from flotilla.blt.metrics import bits_per_byte, summed_nats
from flotilla.blt.model import BLT, ByteTransformer
from flotilla.blt.patcher import (
    calibrate_threshold,
    entropy_starts,
    fixed_starts,
    mean_patch_size,
    patch_ids,
    patch_lengths,
    space_starts,
)

TEXT = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer — naïve"


@pytest.fixture(scope="module")
def real_bytes():
    from flotilla.blt.data import load_role_bytes

    text = load_role_bytes()
    return np.frombuffer(b"".join(text.role(r) for r in text.federated_roles()[:40]), dtype=np.uint8)


# -- bytes ------------------------------------------------------------------------------------


def test_symbols_are_bytes_offset_by_four_with_specials():
    assert (B.BOE, B.BOS, B.EOS, B.BPE, B.OFFSET, B.VOCAB_SIZE) == (0, 1, 2, 3, 4, 260)
    ids = B.encode(TEXT, bos=True, eos=True)
    raw = TEXT.encode("utf-8")
    assert len(ids) == len(raw) + 2 > len(TEXT) + 2  # "—" and "ï" are several bytes each
    assert ids[0] == B.BOS and ids[-1] == B.EOS
    assert ids[1:-1].tolist() == [b + 4 for b in raw]
    assert B.decode(ids) == TEXT
    assert B.decode(B.encode(b"\xff\xfe")) == "\ufffd\ufffd"  # invalid UTF-8 is replaced, not raised
    with pytest.raises(ValueError, match="0..259"):
        B.decode([260])


# -- hash n-grams -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 5, 8])
@pytest.mark.parametrize("table", [50_002, 4099])
def test_ngram_hash_matches_the_direct_formula(n, table):
    x = torch.randint(0, 260, (3, 20), generator=torch.Generator().manual_seed(n))
    got = ngram_hash(x, n, table)
    for b in range(3):
        row = [0] * (n - 1) + x[b].tolist()  # left-padded with zeros
        for t in range(20):
            gram = row[t : t + n]  # the n symbols ending at position t, oldest first
            assert got[b, t] == sum(s * BASE**j for j, s in enumerate(gram)) % table


def test_hash_embeddings_sum_one_table_per_n():
    emb = HashEmbeddings(8, (3, 4), table_size=97)
    x = torch.randint(4, 260, (2, 6))
    want = emb.tables[0](ngram_hash(x, 3, 97)) + emb.tables[1](ngram_hash(x, 4, 97))
    assert torch.equal(emb(x), want)


# -- patcher ----------------------------------------------------------------------------------


def _check_invariants(starts: torch.Tensor, max_patch=None):
    t = starts.shape[1] - 1
    assert starts[:, :2].all()  # positions 0 and 1 always start a patch
    for lengths in patch_lengths(starts):
        assert sum(lengths) == t and min(lengths) >= 1
        if max_patch is not None:
            assert max(lengths) <= max_patch
    ids = patch_ids(starts)
    assert (ids[:, 0] == 0).all() and (ids.diff(dim=1) >= 0).all() and (ids.diff(dim=1) <= 1).all()


@pytest.mark.parametrize("mode", ["global", "monotonic", "combined"])
@pytest.mark.parametrize("max_patch", [None, 3])
def test_entropy_patching_invariants_and_causality_on_random_entropies(mode, max_patch):
    ent = torch.rand(4, 50, generator=torch.Generator().manual_seed(1)) * 3
    starts = entropy_starts(ent, 1.5, mode, threshold_add=0.2, max_patch=max_patch)
    _check_invariants(starts, max_patch)
    if mode == "global" and max_patch is None:
        assert torch.equal(starts[:, 2:], ent[:, 1:] > 1.5)  # H(s) = entropy[:, s-1]
    # the start at byte s depends on entropies < s only, i.e. on bytes < s
    for m in (5, 20, 40):
        changed = ent.clone()
        changed[:, m:] = torch.rand(4, 50 - m) * 3
        assert torch.equal(entropy_starts(changed, 1.5, mode, 0.2, max_patch)[:, : m + 1], starts[:, : m + 1])


def test_space_and_fixed_patching(real_bytes):
    x = B.encode(b" ".join([b"ab", b"c", b"def"]))[None]  # "ab c def"
    assert patch_lengths(space_starts(x)) == [[1, 2, 2, 3]]  # 0 | 1 | after each space
    assert patch_lengths(fixed_starts(1, 10, 4)) == [[1, 4, 4, 1]]
    real = torch.from_numpy(real_bytes[: 64 * 100].astype(np.int64) + 4).view(64, 100)
    for starts, cap in ((space_starts(real), None), (space_starts(real, 5), 5), (fixed_starts(64, 100, 6), 6)):
        _check_invariants(starts, cap)


def test_calibration_hits_the_target_mean_patch_size_on_real_text(real_bytes):
    model = _tiny_blt().entropy_model  # random but sharp: entropies vary with the bytes
    x = torch.from_numpy(real_bytes[: 32 * 64].astype(np.int64) + 4).view(32, 64)
    ent = model.entropy(x)
    assert ((ent >= 0) & (ent <= math.log(260) + 1e-4)).all()
    sizes = []
    for target in (2.0, 4.0, 8.0):
        theta = calibrate_threshold(ent, target)
        starts = entropy_starts(ent, theta)
        _check_invariants(starts)
        sizes.append(mean_patch_size(starts))
        assert abs(sizes[-1] - target) / target < 0.1
    assert sizes == sorted(sizes)
    theta = calibrate_threshold(ent, 3.0, "monotonic")
    assert abs(mean_patch_size(entropy_starts(ent, theta, "monotonic")) - 3.0) < 0.3


# -- causality --------------------------------------------------------------------------------


def _tiny_blt(patching="entropy", seed=0):
    torch.manual_seed(seed)
    ent = ByteTransformer(16, 1, 2, window=8)
    with torch.no_grad():  # a sharper random entropy model: boundaries vary with the bytes
        ent.head.weight.mul_(8)
    return BLT(
        ent,
        patching,
        threshold=4.0,
        patch_size=3,
        local_dim=16,
        global_dim=24,
        heads=2,
        window=8,
        hash_ns=(3, 4),
        hash_table=64,
    )


@pytest.mark.parametrize("patching", ["entropy", "space", "fixed"])
def test_prediction_at_t_never_sees_bytes_after_t(patching):
    """The whole model, patching included: bytes > t never change the logits at <= t, although
    they change the patches after t and the predictions after t."""
    model = _tiny_blt(patching).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(4, 260, (3, 40), generator=g)
    x[:, ::5] = ord(" ") + 4  # spaces, so space patching has boundaries too
    model.threshold = calibrate_threshold(model.entropy_model.entropy(x), 3.0)
    out = model.logits(x)
    boundaries_moved = False
    for t in (0, 7, 20, 38):
        changed = x.clone()
        changed[:, t + 1 :] = torch.randint(4, 260, (3, 39 - t), generator=g)
        after = model.logits(changed)
        torch.testing.assert_close(after[:, : t + 1], out[:, : t + 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(after[:, t + 1 :], out[:, t + 1 :])
        boundaries_moved |= not torch.equal(model.starts(changed), model.starts(x))
        # and byte t does matter to the prediction at t (the test can fail)
        poked = x.clone()
        poked[:, t] = (poked[:, t] - 4 + 1) % 256 + 4
        assert not torch.allclose(model.logits(poked)[:, t], out[:, t])
    assert boundaries_moved or patching == "fixed"
    sizes = [len(row) for row in patch_lengths(model.starts(x))]
    assert min(sizes) > 2 and max(sizes) < 40  # real patches, not one per byte nor one per window


def test_byte_transformer_is_causal_and_layouts_agree():
    torch.manual_seed(0)
    model = ByteTransformer(16, 2, 2, window=6, hash_ns=(3,), hash_table=31).eval()
    x = torch.randint(4, 260, (2, 12))
    changed = x.clone()
    changed[:, 7:] = 4
    torch.testing.assert_close(model.logits(changed)[:, :7], model.logits(x)[:, :7])
    assert model(x).shape == (2, 260, 12)  # training layout: F.cross_entropy(out, y[B, T])
    assert torch.equal(model(x[:, None]), model(x).transpose(1, 2).reshape(-1, 260))  # scoring layout
    with pytest.raises(ValueError, match="expected byte symbols"):
        model(x[None, None])


# -- bits per byte ----------------------------------------------------------------------------


def test_bits_per_byte_against_a_hand_computation():
    # two bytes: p(target) = 1/2 and 1/4 under these logits -> (1 + 2) bits / 2 bytes
    logits = torch.full((2, 260), -1e9)
    logits[0, [10, 11]] = 0.0  # target 10 has probability 1/2
    logits[1, [20, 21, 22, 23]] = 0.0  # target 20 has probability 1/4
    nats = summed_nats(logits, torch.tensor([10, 20]))
    assert bits_per_byte(nats, 2) == pytest.approx(1.5, abs=1e-6)
    uniform = summed_nats(torch.zeros(5, 260), torch.arange(5))
    assert bits_per_byte(uniform, 5) == pytest.approx(math.log2(260), abs=1e-5)
    with pytest.raises(ValueError, match="at least one byte"):
        bits_per_byte(1.0, 0)


def test_tiny_blt_memorises_a_tiny_text():
    text = B.encode("the quick brown fox, the lazy dog")
    x, y = text[:-1][None], text[1:][None]
    model = _tiny_blt("space", seed=3)
    opt = Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    bpb = bits_per_byte(summed_nats(model(x[:, None]), y.reshape(-1)), y.numel())
    assert bpb < 0.15, bpb


# -- entropy model checkpoint -----------------------------------------------------------------


def test_entropy_model_is_not_trainable_inside_blt_and_checkpoint_round_trips(tmp_path, monkeypatch):
    import flotilla.blt.entropy as E

    monkeypatch.setattr(E, "cache_dir", lambda: tmp_path)
    spec = EntropySpec(dim=16, layers=1, heads=2, window=8, seq_len=32, steps=3, batch_size=4)
    with pytest.raises(FileNotFoundError, match="benchmarks/blt.py entropy"):
        load_entropy_model(spec, train_if_missing=False)
    model, _ = train_entropy_model(np.frombuffer(TEXT.encode() * 20, dtype=np.uint8), spec)
    E.save_checkpoint(E.checkpoint_path(spec), spec, model, torch.rand(2, 32))
    loaded, calibration = load_entropy_model(spec, train_if_missing=False)
    x = B.encode(TEXT)[None]
    assert torch.equal(loaded.entropy(x), model.entropy(x)) and calibration.shape == (2, 32)
    blt = BLT(loaded, local_dim=16, global_dim=16, heads=2, hash_ns=())
    names = {n for n, p in blt.named_parameters() if p.requires_grad}
    assert names and not any(n.startswith("entropy_model.") for n in names)
    blt.train()
    assert not blt.entropy_model.training
