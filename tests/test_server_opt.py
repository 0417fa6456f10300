"""Each server optimizer against a hand computation on small tensors (Reddi et al. 2021)."""

import math

import pytest
import torch

from flotilla.core.server_opt import ServerOptimizer, ServerOptimizerSpec

W0 = [1.0, -2.0, 0.5]
D1 = [0.1, -0.2, 0.0]
D2 = [-0.3, 0.4, 0.2]


def run(spec, deltas):
    w = torch.tensor(W0)
    opt = ServerOptimizer(spec, 3)
    for d in deltas:
        opt.step(w, torch.tensor(d))
    return w


def test_fedavg_is_sgd_on_the_mean_delta():
    w = run(ServerOptimizerSpec("fedavg", lr=0.5), [D1, D2])
    expected = [W0[i] + 0.5 * D1[i] + 0.5 * D2[i] for i in range(3)]
    assert w.tolist() == pytest.approx(expected, abs=1e-6)


def test_fedavgm_hand_computed():
    lr, beta = 0.7, 0.9
    w = run(ServerOptimizerSpec("fedavgm", lr=lr, momentum=beta), [D1, D2])
    expected = []
    for i in range(3):
        m1 = D1[i]
        m2 = beta * m1 + D2[i]
        expected.append(W0[i] + lr * m1 + lr * m2)
    assert w.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("v0", [0.0, 1e-6])  # today's default and Reddi et al.'s tau^2
@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_hand_computed(name, v0):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    w = run(ServerOptimizerSpec(name, lr=lr, beta1=b1, beta2=b2, tau=tau, initial_accumulator=v0), [D1, D2])
    expected = []
    for i in range(3):
        wi, m, v = W0[i], 0.0, v0
        for d in (D1[i], D2[i]):
            m = b1 * m + (1 - b1) * d
            if name == "fedadagrad":
                v = v + d * d
            elif name == "fedadam":
                v = b2 * v + (1 - b2) * d * d
            else:
                v = v - (1 - b2) * d * d * math.copysign(1.0, v - d * d) if v != d * d else v
            wi = wi + lr * m / (math.sqrt(v) + tau)
        expected.append(wi)
    assert w.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_state_roundtrip_and_shape_check():
    spec = ServerOptimizerSpec("fedadam", lr=0.1)
    a = ServerOptimizer(spec, 3)
    w = torch.tensor(W0)
    a.step(w, torch.tensor(D1))
    b = ServerOptimizer(spec, 3)
    b.load_state_dict(a.state_dict())
    wa, wb = w.clone(), w.clone()
    a.step(wa, torch.tensor(D2))
    b.step(wb, torch.tensor(D2))
    assert torch.equal(wa, wb)
    with pytest.raises(ValueError, match="shape"):
        b.load_state_dict({"m": torch.zeros(4), "v": torch.zeros(4)})


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="unknown server optimizer"):
        ServerOptimizer(ServerOptimizerSpec("fedsgdx"), 3)


def test_initial_accumulator_from_yaml_reaches_the_optimizer():
    """Issue 11 item 19: ``server.initial_accumulator`` is a config key (default 0: earlier runs
    unchanged; tau^2 for Reddi et al.) and reaches the optimizer's starting v."""
    from flotilla.config import ConfigError, validate
    from flotilla.experiment.specs import server_spec

    base = {"task": {"name": "fashion-mnist", "num_clients": 10}, "rounds": 1, "cohort": 2}
    assert server_spec(validate(base)) == ServerOptimizerSpec()  # default v0 = 0, as before the key
    assert ServerOptimizer(ServerOptimizerSpec("fedadam"), 3).state["v"].tolist() == [0.0] * 3
    spec = server_spec(validate({**base, "server": {"optimizer": "fedyogi", "initial_accumulator": 1e-6}}))
    assert spec.initial_accumulator == 1e-6
    assert ServerOptimizer(spec, 3).state["v"].tolist() == pytest.approx([1e-6] * 3, rel=1e-6)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="server.initial_accumulator"):
            validate({**base, "server": {"optimizer": "fedadam", "initial_accumulator": bad}})
        with pytest.raises(ValueError, match="server.initial_accumulator"):
            ServerOptimizer(ServerOptimizerSpec("fedadam", initial_accumulator=bad), 3)
