"""The FedPepTAO server step against a plain NumPy transcription of SPEC section 3."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedpeptao.core.aggregation import ClientUpdate, weighted_average
from fedpeptao.core.server import ServerState, ServerStepConfig, fedpeptao_step

SHAPES = {"prompt.2": (3, 2, 4), "prompt.5": (3, 2, 4), "head.bias": (2,)}


class NumpyServer:
    """SPEC 3 "Server", line by line, in NumPy (state as plain dicts, missing = zeros)."""

    def __init__(self, num_clients, local_lr, beta=0.9, server_lr=0.05, decay=0.99, lr_min=1e-4,
                 variant="plain", control_variates=True, momentum=True):
        self.N, self.eta_l, self.eta_s, self.decay, self.lr_min = num_clients, local_lr, server_lr, decay, lr_min
        self.beta = beta if momentum else 0.0
        self.variant, self.cv = variant, control_variates
        self.t, self.v, self.c, self.c_k, self.prev_delta = 0, {}, {}, {}, None

    def step(self, theta, clients):  # clients: list of (id, params, n_k, K_k)
        total = sum(n for _, _, n, _ in clients)
        p = [n / total for _, _, n, _ in clients]
        new_theta, delta_now = {}, {}
        for name, th in theta.items():
            zero = np.zeros_like(th)
            # 1. average and pseudo-gradient
            theta_bar = sum(pk * params[name] for pk, (_, params, _, _) in zip(p, clients))
            delta = th - theta_bar
            delta_now[name] = delta
            # 2. control variates (option II)
            c_old = self.c.get(name, zero)
            ck_old = [self.c_k.get(cid, {}).get(name, zero) for cid, _, _, _ in clients]
            if self.cv:
                ck_new = [ck - c_old + (th - params[name]) / (K * self.eta_l)
                          for ck, (_, params, _, K) in zip(ck_old, clients)]
                K_sum = sum(K for _, _, _, K in clients)
                c_new = c_old + (len(clients) / self.N) * sum(
                    K * (new - old) for (_, _, _, K), new, old in zip(clients, ck_new, ck_old)) / K_sum
                self.c[name] = c_new
                for (cid, _, _, _), ck in zip(clients, ck_new):
                    self.c_k.setdefault(cid, {})[name] = ck
            else:
                c_new, ck_new = zero, [zero] * len(clients)
            # 3. server momentum
            if self.t == 0:
                new_theta[name] = theta_bar
                continue
            v_prev = self.v.get(name, zero)
            if self.variant == "plain":
                g = delta
                u = [self.beta * v_prev + (1 - self.beta) * g + c_new - ck for ck in ck_new]
            else:
                g = self.prev_delta[name] - delta
                u, chained = [], v_prev
                for ck in ck_new:
                    chained = self.beta * chained + (1 - self.beta) * g + c_new - ck
                    u.append(chained)
            x = [theta_bar - self.eta_s * uk for uk in u]
            new_theta[name] = sum(pk * xk for pk, xk in zip(p, x))
            self.v[name] = sum(pk * uk for pk, uk in zip(p, u))
        self.prev_delta = delta_now
        self.t += 1
        self.eta_s = max(self.decay * self.eta_s, self.lr_min)
        return new_theta


def make_round(rng: np.random.Generator, theta: dict[str, np.ndarray], num_clients: int, dtype=torch.float64):
    size = int(rng.integers(2, 5))
    ids = rng.choice(num_clients, size=size, replace=False)
    updates = []
    for cid in ids:
        params = {name: theta[name] + 0.1 * rng.standard_normal(theta[name].shape) + 0.02 * cid for name in theta}
        updates.append(ClientUpdate(int(cid), {k: torch.tensor(v, dtype=dtype) for k, v in params.items()},
                                    int(rng.integers(5, 60)), int(rng.integers(1, 12))))
    return updates


def as_numpy(updates):
    return [(u.client_id, {k: v.double().numpy() for k, v in u.params.items()}, u.num_examples, u.num_steps)
            for u in updates]


def run_both(cfg: ServerStepConfig, rounds: int = 6, seed: int = 0, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    theta = {name: rng.standard_normal(shape) for name, shape in SHAPES.items()}
    ours = {k: torch.tensor(v, dtype=dtype) for k, v in theta.items()}
    state = ServerState(server_lr=cfg.server_lr)
    ref = NumpyServer(cfg.num_clients, cfg.local_lr, cfg.beta, cfg.server_lr, cfg.server_lr_decay, cfg.server_lr_min,
                      cfg.variant, cfg.control_variates, cfg.momentum)
    history = []
    for _ in range(rounds):
        updates = make_round(rng, {k: v.double().numpy() for k, v in ours.items()}, cfg.num_clients, dtype)
        ours = fedpeptao_step(ours, updates, state, cfg)
        theta = ref.step(theta, as_numpy(updates))
        history.append((copy.deepcopy(ours), copy.deepcopy(state), copy.deepcopy(theta), copy.deepcopy(ref)))
    return history


def close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=tol, atol=tol)


@pytest.mark.parametrize("variant", ["plain", "reference"])
@pytest.mark.parametrize(("control_variates", "momentum"), [(True, True), (False, True), (True, False), (False, False)])
def test_step_matches_numpy_transcription(variant, control_variates, momentum):
    cfg = ServerStepConfig(num_clients=7, local_lr=0.04, variant=variant, control_variates=control_variates,
                           momentum=momentum)
    for ours, state, theta, ref in run_both(cfg):
        for name in SHAPES:
            close(ours[name], theta[name], 1e-12)
            close(state.momentum.get(name, torch.zeros(SHAPES[name])), ref.v.get(name, np.zeros(SHAPES[name])), 1e-12)
            close(state.control.get(name, torch.zeros(SHAPES[name])), ref.c.get(name, np.zeros(SHAPES[name])), 1e-12)
            close(state.prev_delta[name], ref.prev_delta[name], 1e-12)
        assert set(state.client_control) == set(ref.c_k)
        for cid, tensors in state.client_control.items():
            for name in SHAPES:
                close(tensors[name], ref.c_k[cid][name], 1e-12)
        assert state.round == ref.t and state.server_lr == pytest.approx(ref.eta_s, rel=1e-15)
    if not control_variates:
        assert not state.control and not state.client_control


def test_learning_rate_decays_to_its_floor_and_float32_agrees():
    cfg = ServerStepConfig(num_clients=5, local_lr=0.1, server_lr=0.3, server_lr_decay=0.5, server_lr_min=0.02)
    history = run_both(cfg, rounds=6, seed=3, dtype=torch.float32)
    assert [h[1].server_lr for h in history] == pytest.approx([0.15, 0.075, 0.0375, 0.02, 0.02, 0.02])
    for ours, state, theta, _ in history:
        for name in SHAPES:
            assert ours[name].dtype == torch.float32 and state.momentum.get(name, ours[name]).dtype == torch.float32
            close(ours[name], theta[name], 1e-5)


def test_round_zero_takes_the_average_and_later_rounds_do_not():
    cfg = ServerStepConfig(num_clients=4, local_lr=0.04)
    updates = make_round(np.random.default_rng(1), {k: np.zeros(s) for k, s in SHAPES.items()}, 4)
    state = ServerState()
    glob = {k: torch.zeros(s, dtype=torch.float64) for k, s in SHAPES.items()}
    out = fedpeptao_step(glob, updates, state, cfg)
    avg = weighted_average(updates)
    for name in SHAPES:
        torch.testing.assert_close(out[name], avg[name], rtol=1e-14, atol=1e-14)
    assert not state.momentum and state.round == 1
    out2 = fedpeptao_step(out, updates, state, cfg)
    assert not torch.allclose(out2["prompt.2"], avg["prompt.2"])


def test_plain_ignores_client_order_and_reference_chains_through_it():
    def final(variant, reverse):
        cfg = ServerStepConfig(num_clients=6, local_lr=0.04, variant=variant)
        rng = np.random.default_rng(5)
        glob = {k: torch.tensor(rng.standard_normal(s)) for k, s in SHAPES.items()}
        state = ServerState()
        for _ in range(3):
            updates = make_round(rng, {k: v.numpy() for k, v in glob.items()}, 6)
            glob = fedpeptao_step(glob, updates[::-1] if reverse else updates, state, cfg)
        return glob["prompt.5"]

    torch.testing.assert_close(final("plain", False), final("plain", True), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(final("reference", False), final("reference", True))


def test_single_client_without_extras_extrapolates_the_update():
    # No control variates, no momentum, plain: theta' = theta_bar - eta_s (theta - theta_bar).
    cfg = ServerStepConfig(num_clients=1, local_lr=0.1, control_variates=False, momentum=False, server_lr=0.5)
    state = ServerState(round=1, server_lr=0.5)
    theta = {"w": torch.tensor([1.0, 2.0])}
    out = fedpeptao_step(theta, [ClientUpdate(0, {"w": torch.tensor([0.0, 4.0])}, 3, 2)], state, cfg)
    torch.testing.assert_close(out["w"], torch.tensor([-0.5, 5.0]))


def test_inputs_are_not_mutated():
    cfg = ServerStepConfig(num_clients=5, local_lr=0.04, variant="reference")
    rng = np.random.default_rng(2)
    glob = {k: torch.tensor(rng.standard_normal(s)) for k, s in SHAPES.items()}
    state = ServerState()
    for _ in range(3):
        updates = make_round(rng, {k: v.numpy() for k, v in glob.items()}, 5)
        glob_copy, updates_copy = copy.deepcopy(glob), copy.deepcopy(updates)
        old_tensors = {k: v.clone() for k, v in state.state()[0].items()}
        old_live = state.state()[0]
        new = fedpeptao_step(glob, updates, state, cfg)
        for name in SHAPES:
            assert torch.equal(glob[name], glob_copy[name]) and new[name] is not glob[name]
        for u, uc in zip(updates, updates_copy):
            assert all(torch.equal(u.params[k], uc.params[k]) for k in SHAPES)
        for key, tensor in old_live.items():  # tensors the old state held were replaced, not overwritten
            assert torch.equal(tensor, old_tensors[key])
        glob = new


def test_state_round_trips_through_safetensors(tmp_path):
    cfg = ServerStepConfig(num_clients=6, local_lr=0.04, variant="reference")
    rng = np.random.default_rng(4)
    glob = {k: torch.tensor(rng.standard_normal(s), dtype=torch.float32) for k, s in SHAPES.items()}
    state = ServerState()
    for _ in range(3):
        glob = fedpeptao_step(glob, make_round(rng, {k: v.numpy() for k, v in glob.items()}, 6, torch.float32),
                              state, cfg)
    tensors, meta = state.state()
    save_file({k: t.contiguous() for k, t in tensors.items()}, tmp_path / "server.safetensors")
    restored = ServerState.from_state(load_file(tmp_path / "server.safetensors"), json.loads(json.dumps(meta)))
    assert restored.round == state.round == 3 and restored.server_lr == state.server_lr
    assert list(restored.client_control) == list(state.client_control)
    flat_a, flat_b = state.state()[0], restored.state()[0]
    assert flat_a.keys() == flat_b.keys() and all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a)
    updates = make_round(rng, {k: v.numpy() for k, v in glob.items()}, 6, torch.float32)
    a, b = fedpeptao_step(glob, updates, state, cfg), fedpeptao_step(glob, updates, restored, cfg)
    assert all(torch.equal(a[k], b[k]) for k in SHAPES)
    assert ServerState.from_state(*ServerState().state()) == ServerState()
    empty = ServerState(prev_delta={}, client_control={4: {}})  # kept as they were, not read back as absent
    assert ServerState.from_state(*empty.state()) == empty


@pytest.mark.parametrize("fault", ["missing", "extra", "shape"])
def test_mismatched_update_names_the_client_and_key(fault):
    glob = {k: torch.zeros(s) for k, s in SHAPES.items()}
    good = ClientUpdate(1, {k: torch.ones(s) for k, s in SHAPES.items()}, 10, 3)
    params = {k: torch.ones(s) for k, s in SHAPES.items()}
    if fault == "missing":
        del params["prompt.5"]
        key = "prompt.5"
    elif fault == "extra":
        params["prompt.9"] = torch.ones(3, 2, 4)
        key = "prompt.9"
    else:
        params["head.bias"] = torch.ones(3)
        key = "head.bias"
    state = ServerState()
    with pytest.raises(ValueError, match=rf"client 7.*{key}"):
        fedpeptao_step(glob, [good, ClientUpdate(7, params, 10, 3)], state, ServerStepConfig(4, 0.04))
    assert state == ServerState()


def test_other_invalid_inputs():
    glob = {"w": torch.zeros(2)}
    cfg = ServerStepConfig(4, 0.04)
    with pytest.raises(ValueError):
        fedpeptao_step(glob, [], ServerState(), cfg)
    with pytest.raises(ValueError, match="duplicate"):
        fedpeptao_step(glob, [ClientUpdate(1, {"w": torch.ones(2)}, 1, 1)] * 2, ServerState(), cfg)
    with pytest.raises(ValueError, match="client 3"):
        fedpeptao_step(glob, [ClientUpdate(3, {"w": torch.ones(2)}, 1, 0)], ServerState(), cfg)
    with pytest.raises(ValueError, match="Delta"):
        fedpeptao_step(glob, [ClientUpdate(3, {"w": torch.ones(2)}, 1, 1)], ServerState(round=2),
                       ServerStepConfig(4, 0.04, variant="reference"))
    for bad in ({"beta": 1.0}, {"variant": "other"}, {"server_lr_decay": 0.0}, {"local_lr": 0.0}):
        with pytest.raises(ValueError):
            ServerStepConfig(**{"num_clients": 4, "local_lr": 0.04, **bad})


def test_weighted_average_matches_numpy_and_keeps_dtype():
    rng = np.random.default_rng(0)
    updates = [ClientUpdate(i, {"a": torch.tensor(rng.standard_normal((2, 3)), dtype=torch.float32)}, n, 1)
               for i, n in enumerate([3, 10, 0, 7])]
    want = sum(u.params["a"].double().numpy() * u.num_examples for u in updates) / 20
    got = weighted_average(updates)["a"]
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    bf16 = [ClientUpdate(u.client_id, {"a": u.params["a"].bfloat16()}, u.num_examples, 1) for u in updates]
    assert weighted_average(bf16)["a"].dtype == torch.bfloat16
    with pytest.raises(ValueError):
        weighted_average([ClientUpdate(0, {"a": torch.zeros(1)}, 0, 1)])
