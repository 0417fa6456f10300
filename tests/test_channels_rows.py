"""Sparse embedding rows composed with the other channels (issue 19, flotilla/channels/rows.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flotilla.algorithms.rowwise import Table, layout
from flotilla.channels.codec import Codec, Step
from flotilla.channels.config import ChannelsConfig
from flotilla.channels.device import DeviceChannels
from flotilla.channels.rows import RowsCodec
from flotilla.core.client import ClientSpec
from flotilla.core.dataset import FederatedDataset
from flotilla.experiment.compose import build_algorithm
from flotilla.sim.sync import SyncFedAvg

# flat layout: w (3, 4) dense = [0, 12), a (5, 2) table = [12, 22), bias (3,) dense = [22, 25),
# b (100, 4) table = [25, 425)
SHAPES = [(3, 4), (5, 2), (3,), (100, 4)]
TABLES = [Table("a", 12, 5, 2), Table("b", 25, 100, 4)]
NUMEL = 425
ROWS = {"a": torch.tensor([1, 4]), "b": torch.tensor([7])}


def delta_on(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(NUMEL)
    x[:12] = torch.randn(12, generator=g)
    x[22:25] = torch.randn(3, generator=g)
    for t in TABLES:
        r = rows[t.name]
        x[t.start : t.stop].view(t.rows, t.dim)[r] = torch.randn(len(r), t.dim, generator=g)
    return x


def restricted(x, rows):
    """The tensors a dense channel would see if the update were cut to the touched rows."""
    w, bias = x[:12].view(3, 4), x[22:25]
    a = x[12:22].view(5, 2)[rows["a"]]
    b = x[25:].view(100, 4)[rows["b"]]
    return [w, a, bias, b]


@pytest.mark.parametrize(
    "steps",
    [
        [Step("fp16")],
        [Step("quantize", bits=4, per_channel=True, stochastic=False)],
        [Step("quantize", bits=3, stochastic=False)],
        [Step("topk", keep=0.5), Step("bf16")],
    ],
)
def test_rows_decode_to_the_channel_applied_to_the_touched_rows(steps):
    codec = RowsCodec(steps, SHAPES, TABLES)
    x = delta_on(ROWS)
    data, sent = codec.encode(x, ROWS)
    decoded, rows = codec.decode(data)  # the server's side: from the bytes alone
    assert torch.equal(decoded, sent)
    assert {k: v.tolist() for k, v in rows.items()} == {"a": [1, 4], "b": [7]}
    # each tensor through the chain on its own, the tables as their touched rows only
    want = [Codec(steps, [tuple(t.shape)]).apply(t.reshape(-1)) for t in restricted(x, ROWS)]
    got = restricted(sent, ROWS)
    for w, g in zip(want, got):
        assert torch.equal(g.reshape(-1), w)
    untouched = torch.ones(NUMEL, dtype=torch.bool)
    untouched[:12] = untouched[22:25] = False
    untouched[12:22].view(5, 2)[ROWS["a"]] = False
    untouched[25:].view(100, 4)[ROWS["b"]] = False
    assert bool((sent[untouched] == 0).all())
    assert not torch.equal(sent, x)  # lossy: the chain did act on the values


@pytest.mark.parametrize(
    "steps, values",
    [
        # fp32: w 48 + a 2x2x4 + bias 12 + b 1x4x4
        ([], 48 + 16 + 12 + 16),
        # fp16: 2 bytes a value
        ([Step("fp16")], 24 + 8 + 6 + 8),
        # 8-bit per channel: w 12 codes + 3 rows x 12; a block (2, 2): 4 + 2 x 12; bias fp32 12; b (1, 4): 4 + 12
        ([Step("quantize", bits=8, per_channel=True)], (12 + 36) + (4 + 24) + 12 + (4 + 12)),
        # top-half + 2-bit per tensor: w 6 kept, bitmap 2, ceil(12/8) + 12; a 2 kept of 4, bitmap 1, 1 + 12;
        # bias (1-D) 2 kept, bitmap 1, fp32 8; b 2 kept of 4, bitmap 1, 1 + 12
        (
            [Step("topk", keep=0.5), Step("quantize", bits=2)],
            (2 + 2 + 12) + (1 + 1 + 12) + (1 + 8) + (1 + 1 + 12),
        ),
    ],
)
def test_row_message_bytes_by_hand(steps, values):
    codec = RowsCodec(steps, SHAPES, TABLES)
    # row counts 2 x 4 B; a: 2 ids = 8 B vs a 5-row bitmap 1 B -> bitmap; b: 1 id = 4 B vs 13 B -> id
    expected = 8 + 1 + 4 + values
    assert codec.message_bytes(ROWS) == expected
    data, _ = codec.encode(delta_on(ROWS), ROWS, torch.Generator().manual_seed(0))
    assert len(data) == expected


def test_row_ids_or_bitmap_whichever_is_smaller():
    codec = RowsCodec([], SHAPES, TABLES)
    dense = 4 * 15
    for k, row_set in [(0, 0), (1, 4), (3, 12), (4, 13), (50, 13), (100, 13)]:  # bitmap of 100 rows: 13 B
        rows = {"a": torch.tensor([0]), "b": torch.arange(k)}
        a = 4 + 1 + 2 * 4
        assert codec.message_bytes(rows) == dense + a + 4 + row_set + 16 * k
        data, sent = codec.encode(delta_on(rows, k), rows)
        assert len(data) == codec.message_bytes(rows)
        assert torch.equal(codec.decode(data)[0], sent)


def test_an_update_moving_other_rows_and_malformed_payloads_are_refused():
    codec = RowsCodec([Step("fp16")], SHAPES, TABLES)
    with pytest.raises(ValueError, match="changed 1 rows of b outside"):
        codec.encode(delta_on({"a": ROWS["a"], "b": torch.tensor([7, 9])}), ROWS)
    data, _ = codec.encode(delta_on(ROWS), ROWS)
    with pytest.raises(ValueError, match="bytes"):
        codec.decode(data[:-1])
    bad = bytearray(data)
    # bytes: row counts [0, 8), a's 5-row bitmap [8], b's one int32 id [9, 13), then the values
    bad[8] = 0b111  # a's bitmap marks three rows where its count says two
    with pytest.raises(ValueError, match="bitmap of a"):
        codec.decode(bytes(bad))
    bad = bytearray(data)
    bad[9:13] = (100).to_bytes(4, "little")  # b's one row id outside its 100 rows
    with pytest.raises(ValueError, match="row ids of b"):
        codec.decode(bytes(bad))


def test_error_feedback_residual_stays_on_the_device_and_on_its_rows():
    cfg = ChannelsConfig.model_validate(
        {"upload": [{"name": "topk", "keep": 0.25}, {"name": "quantize", "bits": 4}], "error_feedback": True}
    )
    device = DeviceChannels(cfg, SHAPES, tables=TABLES)
    server = RowsCodec(cfg.steps("upload"), SHAPES, TABLES)
    residual, sent_total, true_total = None, torch.zeros(NUMEL), torch.zeros(NUMEL)
    for t in range(5):
        delta = delta_on(ROWS, t)
        data, sent, residual = device.upload(delta, seed=t, residual=residual, rows=ROWS)
        received, _ = server.decode(data)
        assert torch.equal(received, sent)  # the server gets what was sent, never the residual
        assert len(data) == server.message_bytes(ROWS)
        sent_total += received
        true_total += delta
    assert torch.allclose(sent_total + residual, true_total, atol=1e-5)
    assert float(residual.abs().sum()) > 0
    # the residual lives on the touched rows and dense part only, so the next upload stays row-sparse
    assert bool((residual[12:22].view(5, 2)[[0, 2, 3]] == 0).all())
    assert int(residual[25:].view(100, 4).ne(0).any(1).sum()) <= 1
    with pytest.raises(ValueError, match="needs the rows"):
        device.upload(delta, seed=0, residual=None)


# ---------------------------------------------------------------- in the simulator, end to end


class ItemData(FederatedDataset):
    """Each example two item ids out of 30; a client touches the items in its training data."""

    tables = ("emb.weight",)

    def __init__(self, clients=8, per_client=6):
        g = torch.Generator().manual_seed(0)
        x = torch.stack([torch.randint(c * 3, c * 3 + 6, (per_client * 2, 2), generator=g) for c in range(clients)])
        x = x.reshape(-1, 2) % 30
        y = (x.sum(1) % 3).long()
        train = [torch.arange(c * 2 * per_client, c * 2 * per_client + per_client) for c in range(clients)]
        test = [t + per_client for t in train]
        super().__init__("items", lambda i: (x[i], y[i]), train, test)
        self.x = x
        self.asked = []  # clients whose rows the device side asked for (one per upload)

    def embedding_rows(self, client):
        self.asked.append(client)
        return {"emb.weight": self.x[self.train_indices[client]].unique()}


class ItemModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)  # dense first: the table is not at offset 0
        self.emb = nn.Embedding(30, 4)

    def forward(self, x):
        return self.head(self.emb(x).sum(1))


def _run(rows, channels, rounds=2, **kw):
    torch.manual_seed(0)
    data = ItemData()
    kwargs = dict(
        model=ItemModel(), dataset=data, loss_fn=F.cross_entropy, cohort=4, client=ClientSpec(steps=2, batch_size=3)
    )
    algo, _ = build_algorithm(SyncFedAvg, {**kwargs, **kw}, rounds=rounds, channels=channels, embedding_rows=rows)
    return algo, [algo.step() for _ in range(rounds)], data


def test_sync_rounds_with_rows_and_channels_count_each_message_exactly():
    fp32, rec32, data32 = _run("sparse", {})
    plain, recp, _ = _run("sparse", None)
    assert torch.equal(fp32.weights, plain.weights)  # an fp32 row upload changes no value
    half, rec16, data16 = _run("sparse", {"upload": [{"name": "fp16"}], "download": [{"name": "fp16"}]})
    assert not torch.equal(half.weights, plain.weights)
    # the exact count: each uploading client's own message size (its rows), summed over the rounds
    tables = layout(ItemModel(), ItemData.tables)
    for rec, data, steps in ((rec32, data32, []), (rec16, data16, [Step("fp16")])):
        codec = RowsCodec(steps, [(3, 4), (3,), (30, 4)], tables)
        assert len(data.asked) == 8  # 4 clients x 2 rounds, each asked for its rows once
        assert rec[-1]["bytes_up"] == sum(codec.message_bytes(data.embedding_rows(c)) for c in list(data.asked))
    assert rec32[-1]["bytes_up"] < 8 * 4 * 135  # smaller than 8 dense fp32 uploads
    assert rec16[-1]["bytes_up"] < rec32[-1]["bytes_up"] and rec16[-1]["bytes_down"] == 8 * 2 * 135
    # the sparse mode's own fp32 byte metrics give way to the channels' exact bytes_up
    assert "upload_bytes_mean" in recp[-1] and "upload_bytes_mean" not in rec32[-1]


def test_rowwise_with_quantised_rows_and_error_feedback_checkpoints_residuals():
    channels = {
        "upload": [{"name": "topk", "keep": 0.3}, {"name": "quantize", "bits": 8, "per_channel": True}],
        "error_feedback": True,
    }
    algo, recs, data = _run("rowwise", channels)
    state = algo.state_dict()
    residuals = {int(k.rsplit(".", 1)[1]): v for k, v in state.items() if k.startswith("channels.residual.")}
    assert len(residuals) == recs[-1]["residual_clients"] > 0
    table = layout(ItemModel(), data.tables)[0]
    for c, r in residuals.items():  # each device's residual only on its own rows
        moved = r[table.start : table.stop].view(30, 4).ne(0).any(1).nonzero().squeeze(1)
        assert set(moved.tolist()) <= set(data.embedding_rows(c)["emb.weight"].tolist())
    assert "upload_bytes_mean" not in recs[-1]  # rowwise's fp32 byte metrics give way to bytes_up
    again, _, _ = _run("rowwise", channels, rounds=3)
    again.load_state_dict(state)
    assert torch.equal(again.step()["bytes_up"] * torch.ones(1), algo.step()["bytes_up"] * torch.ones(1))
    assert torch.equal(again.weights, algo.weights)


def test_row_uploads_with_channels_are_refused_where_they_cannot_work():
    from flotilla.fleet.fleet import make_fleet
    from flotilla.sim.fleet import SyncFleetSim

    data = ItemData()
    fleet = make_fleet(population=20, seed=0, train_sizes=data.train_sizes.numpy(), model_bytes=540)
    kwargs = dict(
        model=ItemModel(),
        dataset=data,
        loss_fn=F.cross_entropy,
        cohort=4,
        client=ClientSpec(steps=1, batch_size=3),
        fleet=fleet,
    )
    with pytest.raises(ValueError, match=r"server\.embedding_rows: sparse with channels: not on the SyncFleetSim"):
        build_algorithm(
            SyncFleetSim, kwargs, rounds=1, channels={"upload": [{"name": "fp16"}]}, embedding_rows="sparse"
        )
    kwargs.pop("fleet")
    q8 = {"upload": [{"name": "quantize", "bits": 8}]}  # (quantize alone goes into the ring: rows would not)
    with pytest.raises(ValueError, match=r"rowwise cannot run with secure_aggregation: the server sees only"):
        build_algorithm(SyncFedAvg, kwargs, rounds=1, channels=q8, embedding_rows="rowwise", secure_aggregation={})
    from flotilla.channels.sim import rows_refusal  # (building DP imports Opacus: the function alone)

    dp = {"user_level": {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-3}}
    assert "sparse cannot run with privacy: DP noise" in rows_refusal("sparse", "SyncFedAvg", privacy=dp)
    assert rows_refusal("sparse", "SyncFedAvg") is None


def test_config_accepts_rows_with_channels_and_serve_refuses_them_with_the_reason():
    from flotilla.config import ConfigError, validate
    from flotilla.experiment.serve import server_from_config

    task = {"name": "movielens", "max_users": 40}
    keys = {"server": {"embedding_rows": "rowwise"}, "channels": {"upload": [{"name": "fp16"}]}}
    cfg = validate({"task": task, "rounds": 1, **keys})
    assert cfg.server.embedding_rows == "rowwise" and cfg.channels.upload[0].name == "fp16"
    with pytest.raises(ConfigError, match=r"server\.embedding_rows: rowwise cannot run here: mode: async"):
        validate({"task": task, "rounds": 1, "mode": "async", **keys})
    net = {"tls": {"cert": "c.pem", "key": "k.pem"}, "tokens": "t.txt"}
    with pytest.raises(ConfigError, match=r"server\.embedding_rows: rowwise is simulated only"):
        server_from_config(validate({"task": task, "rounds": 1, "network": net, **keys}))


def test_row_codec_refuses_a_table_that_is_not_a_parameter_and_sends_nothing_for_an_empty_block():
    with pytest.raises(ValueError, match="table a is not a parameter tensor"):
        RowsCodec([], [(3, 4)], [Table("a", 4, 2, 4)])
    codec = RowsCodec([Step("quantize", bits=4)], SHAPES, TABLES)
    rows = {"a": torch.tensor([], dtype=torch.long), "b": torch.tensor([3])}
    # a sends its count (4 B) and nothing else: no bitmap, no scale for an empty block
    assert codec.message_bytes(rows) == 4 + 4 + 4 + (6 + 12) + 12 + (2 + 12)
    data, sent = codec.encode(delta_on(rows), rows)
    assert len(data) == codec.message_bytes(rows) and torch.equal(codec.decode(data)[0], sent)
