"""The config.yaml a run saves validates back to the same experiment (issue 11 item 14).

The saved file lists every key with its value (``max_norm: null``, ``degree: auto``, ``bits: 32``);
validators must judge keys by value, not by presence, or ``flotilla run --resume`` refuses the
run's own config."""

from pathlib import Path

import pytest

from flotilla.config import load_config, validate
from flotilla.runs.rundir import RunDir

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
TASK = {"name": "fashion-mnist", "num_clients": 50}
NETWORK = {"tls": {"cert": "s.pem", "key": "s.key"}, "tokens": "t.json"}
USER_DP = {"clip_norm": 0.5, "noise_multiplier": 1.0}

GENERATED = {
    "plain": {"task": TASK, "rounds": 3},
    "shakespeare": {"task": {"name": "shakespeare", "model": {"hidden": 16}}, "rounds": 2, "cohort": 3},
    "sync fleet": {
        "task": TASK,
        "rounds": 2,
        "fleet": {
            "population": 100,
            "deadline_s": 60,
            "speed": {"dist": "uniform", "low": 1, "high": 5},
            "availability": {"diurnal": [0.5] * 24, "session_s": 600},
        },
    },
    "async fedbuff": {
        "task": TASK,
        "rounds": 2,
        "mode": "async",
        "fleet": {"population": 100},
        "async": {"concurrency": 20, "buffer_size": 5, "max_staleness": 4},
    },
    "async fedasync": {
        "task": TASK,
        "rounds": 2,
        "mode": "async",
        "async": {
            "algorithm": "fedasync",
            "concurrency": 10,
            "arrival_rate": 2.0,
            "staleness": {"kind": "hinge", "average": 1.0},
        },
    },
    "sample-level dp": {"task": TASK, "rounds": 2, "privacy": {"sample_level": {"noise_multiplier": 1.1}}},
    "user-level dp": {"task": TASK, "rounds": 2, "privacy": {"accountant": "prv", "user_level": USER_DP}},
    "user-level target epsilon": {
        "task": TASK,
        "rounds": 2,
        "privacy": {
            "user_level": {"clip_norm": 1.0, "target_epsilon": 8.0, "sampling": "poisson", "adaptive_clipping": {}}
        },
    },
    "async user-level dp": {
        "task": TASK,
        "rounds": 2,
        "mode": "async",
        "async": {"concurrency": 10},
        "privacy": {"user_level": USER_DP, "sample_level": {}},
    },
    "secure aggregation sync": {"task": TASK, "rounds": 2, "cohort": 5, "secure_aggregation": {}},
    "secure aggregation sync, every key": {
        "task": TASK,
        "rounds": 2,
        "cohort": 5,
        "secure_aggregation": {
            "degree": "full",
            "threshold": 3,
            "clip": 2.0,
            "bits": 64,
            "max_weight": 600,
            "dropout": {"mask": 0.1, "unmask": 0.1, "seed": 3},
        },
    },
    "secure aggregation sync + dp": {
        "task": TASK,
        "rounds": 2,
        "cohort": 5,
        "secure_aggregation": {"degree": 2},
        "privacy": {"user_level": USER_DP},
    },
    "secure aggregation async": {
        "task": TASK,
        "rounds": 2,
        "mode": "async",
        "async": {"concurrency": 10, "buffer_size": 4},
        "secure_aggregation": {"max_norm": 10.0},
    },
    "secure aggregation async, defaults": {
        "task": TASK,
        "rounds": 2,
        "mode": "async",
        "async": {"concurrency": 10},
        "secure_aggregation": {},
    },
    "network sync + secure aggregation": {
        "task": TASK,
        "rounds": 2,
        "cohort": 4,
        "weighting": "uniform",
        "network": {**NETWORK, "round_deadline_s": 30, "max_update_norm": 5.0},
        "secure_aggregation": {},
    },
    "network async": {
        "task": TASK,
        "rounds": 2,
        "mode": "async",
        "async": {"concurrency": 10},
        "network": {**NETWORK, "tls": {**NETWORK["tls"], "ca": "ca.pem", "require_client_cert": True}},
        "privacy": {"user_level": USER_DP},
    },
}


def saved_and_read_back(cfg, tmp_path):
    """What `flotilla run` writes to config.yaml and `--resume` validates."""
    rd = RunDir(tmp_path / "run")
    rd.write_config(cfg.model_dump(mode="json"))
    return validate(rd.read_config())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_round_trip(path, tmp_path):
    cfg = load_config(path)
    assert saved_and_read_back(cfg, tmp_path).model_dump() == cfg.model_dump()


def test_example_variants_round_trip(tmp_path):
    """The variants the examples' comments suggest (async secure buffer, secure aggregation + DP)."""
    variants = [
        ("fashion_secagg.yaml", ["mode=async", "async.buffer_size=10", "secure_aggregation={max_norm: 10}"]),
        ("fashion_secagg.yaml", ["privacy={user_level: {clip_norm: 0.5, noise_multiplier: 0.5}}"]),
        ("fashion_fedbuff.yaml", ["async.algorithm=fedasync"]),
        ("fashion_fedbuff.yaml", ["mode=sync", "async=null", "cohort=76"]),
    ]
    examples = {p.name: p for p in EXAMPLES}
    for name, overrides in variants:
        cfg = load_config(examples[name], overrides)
        assert saved_and_read_back(cfg, tmp_path).model_dump() == cfg.model_dump(), (name, overrides)


@pytest.mark.parametrize("name", list(GENERATED))
def test_generated_configs_round_trip(name, tmp_path):
    cfg = validate(GENERATED[name])
    again = saved_and_read_back(cfg, tmp_path)
    assert again.model_dump() == cfg.model_dump()
    # and once more: the saved form is a fixed point
    assert saved_and_read_back(again, tmp_path).model_dump() == cfg.model_dump()


def test_presence_of_a_default_is_not_a_choice():
    """The sync-only keys at their defaults are accepted in async mode, and max_norm: null in sync
    mode; a real value is still refused where it has no effect."""
    base = {"task": TASK, "rounds": 2, "mode": "async", "async": {"concurrency": 10}}
    validate({**base, "secure_aggregation": {"degree": "auto", "bits": 32, "threshold": None, "dropout": None}})
    validate({"task": TASK, "rounds": 2, "cohort": 5, "secure_aggregation": {"max_norm": None}})
    with pytest.raises(ValueError, match="secure_aggregation.bits: only used by sync masking"):
        validate({**base, "secure_aggregation": {"bits": 64}})
    with pytest.raises(ValueError, match="secure_aggregation.max_norm: only for mode: async"):
        validate({"task": TASK, "rounds": 2, "cohort": 5, "secure_aggregation": {"max_norm": 3.0}})
