"""Every value in a config is checked before any work (issue 11 items 12, 26, 27, 28).

Floats are finite and fit a float32, integers are integers (no true, no "3") and fit an int64,
switches are booleans; each refusal is one line naming the dotted key (or the file)."""

import argparse

import pytest
import yaml

from flotilla.config import ConfigError, load_config, validate

BASE = {"task": {"name": "fashion-mnist", "num_clients": 20}, "rounds": 1, "cohort": 5}
NETWORK = {"tls": {"cert": "server.pem", "key": "server.key"}, "tokens": "tokens.json"}


def write(tmp_path, text: str):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def with_key(cfg: dict, dotted: str, value) -> dict:
    cfg = yaml.safe_load(yaml.safe_dump(cfg))  # deep copy
    node = cfg
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return cfg


def refusal(tmp_path, cfg: dict) -> list[str]:
    """The problem lines of the refusal (YAML text written and read back, as `flotilla run` does)."""
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, yaml.safe_dump(cfg)))
    head, *lines = str(e.value).splitlines()
    assert head == "invalid config:"
    return [line.strip() for line in lines]


@pytest.mark.parametrize(
    "key, yaml_value, reason",
    [
        ("server.lr", ".inf", "must be finite"),
        ("client.lr", ".inf", "must be finite"),
        ("client.lr", "1e39", "must be finite"),  # YAML reads 1e39 as a string: finite in Python, inf in float32
        ("client.lr", ".nan", "must be finite"),
        ("seed", "99999999999999999999999", "64-bit integer"),
        ("rounds", "true", "must be a number"),
        ("rounds", '"3"', "valid integer"),
        ("rounds", "3.0", "valid integer"),
        ("output.tensorboard", "1", "true or false"),
        ("privacy.sample_level.noise_multiplier", ".inf", "must be finite"),
        ("fleet.latency_s", "1e39", "must be finite"),
        ("fleet.speed.value", ".nan", "must be finite"),
        ("async.mixing", ".inf", "must be finite"),
        ("network.max_message_mb", "1e9", "less than or equal to 2047"),
        ("network.max_message_mb", ".inf", "must be finite"),
        ("network.chunk_kb", "1e7", "valid integer"),
        ("network.chunk_kb", "10000000", "do not fit"),
        ("secure_aggregation.bits", '"32"', "valid integer"),
    ],
)
def test_bad_value_refused_in_one_line_naming_the_key(tmp_path, key, yaml_value, reason):
    cfg = dict(BASE)
    if key.startswith("network."):
        cfg["network"] = dict(NETWORK)
    if key.startswith("async."):
        cfg["mode"] = "async"
    if key.startswith("fleet.speed."):
        cfg["fleet"] = {"speed": {"dist": "constant"}}
    cfg = with_key(cfg, key, yaml.safe_load(f"v: {yaml_value}")["v"])
    lines = refusal(tmp_path, cfg)
    assert len(lines) == 1, lines
    where = "network" if key == "network.chunk_kb" and reason == "do not fit" else key  # a cross-key check
    assert lines[0].startswith(f"{where}:") and reason in lines[0], lines


@pytest.mark.parametrize(
    "key, value",
    [
        ("client.lr", "1e-3"),  # a string to YAML: still a float
        ("seed", 2**63 - 1),
        ("output.tensorboard", True),
        ("fleet.speed", 20),
        ("network.max_message_mb", 2047),
    ],
)
def test_good_values_still_accepted(key, value):
    cfg = with_key(dict(BASE, network=NETWORK), key, value)
    validate(cfg)


def test_set_values_arrive_typed(tmp_path):
    path = write(tmp_path, yaml.safe_dump(BASE))
    cfg = load_config(path, ["rounds=3", "client.lr=1e-3", "output.tensorboard=true", "seed=7"])
    assert (cfg.rounds, cfg.client.lr, cfg.output.tensorboard, cfg.seed) == (3, 1e-3, True, 7)
    with pytest.raises(ConfigError, match="rounds: must be a number"):
        load_config(path, ["rounds=true"])


def sections_in(field) -> list[type]:
    from flotilla.core.schema import Section

    return [
        t
        for t in (field.annotation, *getattr(field.annotation, "__args__", ()))
        if isinstance(t, type) and issubclass(t, Section)
    ]


def all_sections() -> set[type]:
    from flotilla.config import ExperimentConfig

    seen, todo = set(), [ExperimentConfig]
    while todo:
        model = todo.pop()
        if model not in seen:
            seen.add(model)
            todo += [t for f in model.model_fields.values() for t in sections_in(f)]
    return seen


def test_every_section_gets_the_rules():
    """The rules live once in core.schema.Section: every section of every module derives from it."""
    from flotilla.core.schema import Section

    seen = all_sections()
    for model in seen:
        assert issubclass(model, Section), model
        assert model.model_config.get("allow_inf_nan") is False and model.model_config.get("extra") == "forbid", model
    modules = {m.__module__ for m in seen}
    assert {"flotilla.config", "flotilla.fleet.config", "flotilla.network.config"} <= modules
    assert len(seen) >= 20


def test_binary_or_unreadable_config_names_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:") and len(str(e.value).splitlines()) == 1
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "rounds: [1,\n"))
    assert str(e.value).startswith(str(tmp_path / "exp.yaml")) and "line" in str(e.value)
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ConfigError, match=f"^{tmp_path}: cannot read"):
        load_config(tmp_path)  # a folder
    with pytest.raises(ConfigError, match="exp.yaml: the file must hold a YAML mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_async_does_not_check_the_unused_cohort():
    """Item 28: mode async has no cohort; the default 10 with 4 clients was refused."""
    cfg = {
        "task": {"name": "fashion-mnist", "num_clients": 4},
        "rounds": 1,
        "mode": "async",
        "fleet": {"population": 8},
        "async": {"concurrency": 4, "buffer_size": 2},
    }
    assert validate(cfg).cohort == 10
    with pytest.raises(ConfigError, match="cohort: 10 is larger than the population"):
        validate({**cfg, "mode": "sync", "async": None, "fleet": None})


def test_ports_are_refused_not_wrapped():
    from flotilla.network.addresses import port_number, server_address

    assert port_number("0") == 0 and port_number("65535") == 65535
    for bad in ("70000", "-5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="port"):
            port_number(bad)
    assert server_address("example.org:443") == "example.org:443"
    for bad in ("example.org:70000", "example.org:0", "example.org", ":80"):
        with pytest.raises(argparse.ArgumentTypeError):
            server_address(bad)


def test_fashion_mnist_root_key_and_variable(tmp_path, monkeypatch):
    """Item 27: the data root comes from task.root or $FLOTILLA_FASHION_MNIST; the error names both."""
    from flotilla.data import fashion_mnist as fm
    from flotilla.data.cache import DatasetMissingError

    cfg = validate(with_key(BASE, "task.root", str(tmp_path)))
    assert cfg.task.root == str(tmp_path)
    with pytest.raises(DatasetMissingError) as e:
        fm.load_fashion_mnist(tmp_path)
    assert str(tmp_path) in str(e.value) and "task.root" in str(e.value) and "FLOTILLA_FASHION_MNIST" in str(e.value)
    monkeypatch.setenv("FLOTILLA_FASHION_MNIST", str(tmp_path / "elsewhere"))
    assert fm.data_root() == tmp_path / "elsewhere"
    with pytest.raises(DatasetMissingError, match="elsewhere"):
        fm.load_fashion_mnist()
    assert fm.data_root(tmp_path) == tmp_path  # the key wins over the variable


def test_help_says_when_a_required_key_is_required():
    """Item 26: keys of optional or defaulted sections are not plainly 'required'; every key says what it means."""
    from flotilla.config import describe_options

    lines = {line.split(":")[0].strip(): line for line in describe_options() if line.startswith("  ")}
    assert "required when fleet.speed is given" in lines["fleet.speed.dist"]
    assert "required when network is given" in lines["network.tls.cert"]
    assert "required when privacy.user_level is given" in lines["privacy.user_level.clip_norm"]
    assert lines["rounds"].split(", ")[1].startswith("required.")
    undocumented = [
        f"{m.__name__}.{name}"
        for m in all_sections()
        for name, f in m.model_fields.items()
        if not f.description and not sections_in(f)
    ]
    assert not undocumented


def test_task_root_reaches_the_loader(tmp_path):
    from flotilla.data.cache import DatasetMissingError
    from flotilla.tasks import build_task

    cfg = validate(with_key(BASE, "task.root", str(tmp_path / "fmnist")))
    with pytest.raises(DatasetMissingError, match="fmnist/ .*task.root"):
        build_task(cfg.task, 0)
