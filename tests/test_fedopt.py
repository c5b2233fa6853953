"""Federated optimisers against independent NumPy transcriptions of their published update rules.

- FedAdam / FedYogi / FedAdagrad: Reddi et al. (2021), "Adaptive Federated Optimization", Alg. 2.
- SCAFFOLD: Karimireddy et al. (2020), Alg. 1 with option II control variates.
- FedProx's proximal gradient and MOON's contrastive term, on a tiny model.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedpeptao.baselines.optimizers import (CONTROL_PREFIX, DELTA_CONTROL_PREFIX, FedOptRule, FedProxRule, MoonRule,
                                            ScaffoldRule, make_rule)
from fedpeptao.core.client import LocalTrainConfig, local_train
from fedpeptao.core.server import ClientUpdate
from fedpeptao.data.encoding import EncodedDataset
from fedpeptao.models.classifier import PromptedClassifier
from fedpeptao.models.tiny import tiny_backbone

SHAPES = {"prompt.layers.0": (2, 2, 3), "head.weight": (2, 3), "head.bias": (2,)}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tensors(arrays):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in arrays.items()}


def random_round(rng, x, num_clients, scale):
    """A sampled subset with local models scattered around x; sizes and step counts vary."""
    ids = np.sort(rng.choice(num_clients, size=int(rng.integers(2, 5)), replace=False))
    return [(int(k), {n: x[n] + scale * rng.standard_normal(x[n].shape) for n in x}, int(rng.integers(1, 40)),
             int(rng.integers(1, 9))) for k in ids]


class NumpyFedOpt:
    """Reddi et al. (2021) Alg. 2, server part: m_{-1} = 0, v_{-1} = tau^2, no bias correction."""

    def __init__(self, kind, eta, beta1, beta2, tau):
        self.kind, self.eta, self.b1, self.b2, self.tau = kind, eta, beta1, beta2, tau
        self.m, self.v = {}, {}
        self.yogi_signs = set()

    def step(self, x, clients, weighted):
        sizes = np.array([n for _, _, n, _ in clients], dtype=np.float64)
        w = sizes / sizes.sum() if weighted else np.full(len(clients), 1.0 / len(clients))
        new = {}
        for name, xt in x.items():
            delta = sum(wk * (y[name] - xt) for wk, (_, y, _, _) in zip(w, clients))  # Delta_t
            m = self.b1 * self.m.get(name, np.zeros_like(xt)) + (1 - self.b1) * delta
            v = self.v.get(name, np.full_like(xt, self.tau ** 2))
            if self.kind == "adagrad":
                v = v + delta ** 2
            elif self.kind == "adam":
                v = self.b2 * v + (1 - self.b2) * delta ** 2
            else:  # yogi
                self.yogi_signs |= set(np.sign(v - delta ** 2).ravel().tolist())
                v = v - (1 - self.b2) * delta ** 2 * np.sign(v - delta ** 2)
            self.m[name], self.v[name] = m, v
            new[name] = xt + self.eta * m / (np.sqrt(v) + self.tau)
        return new


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
@pytest.mark.parametrize("weighted", [False, True])
def test_adaptive_server_matches_reddi_alg2(kind, weighted):
    rng = np.random.default_rng(7)
    x = {n: rng.standard_normal(s) for n, s in SHAPES.items()}
    ref = NumpyFedOpt(kind, eta=0.03, beta1=0.9, beta2=0.99, tau=1e-3)
    rule = make_rule(f"fed{kind}", num_clients=10, local_lr=0.1, lr=0.03, weighted=weighted)
    assert isinstance(rule, FedOptRule) and (rule.beta1, rule.beta2, rule.tau) == (0.9, 0.99, 1e-3)
    current = tensors(x)
    for t in range(6):
        clients = random_round(rng, x, 10, scale=0.3 if t % 2 else 0.01)  # big and small steps: both Yogi branches
        updates = [ClientUpdate(k, tensors(y), n, steps) for k, y, n, steps in clients]
        current = rule.aggregate(current, updates)
        x = ref.step(x, clients, weighted)
        for name in x:
            np.testing.assert_allclose(current[name].numpy(), x[name], rtol=1e-10, atol=1e-12)
            assert current[name].dtype == torch.float64
    if kind == "yogi":
        assert {-1.0, 1.0} <= ref.yogi_signs


def test_adaptive_servers_differ_and_keep_float32():
    x = {n: torch.zeros(s) for n, s in SHAPES.items()}
    ups = [ClientUpdate(0, {n: torch.full(s, 0.5) for n, s in SHAPES.items()}, 3, 2),
           ClientUpdate(1, {n: torch.full(s, -0.1) for n, s in SHAPES.items()}, 1, 2)]
    results = {}
    for kind in ("fedadam", "fedyogi", "fedadagrad"):
        rule = make_rule(kind, 4, 0.1)
        cur = x
        for _ in range(3):
            cur = rule.aggregate(cur, ups)
        results[kind] = cur["head.bias"]
        assert cur["head.bias"].dtype == torch.float32
    assert not torch.allclose(results["fedadam"], results["fedyogi"])
    assert not torch.allclose(results["fedadam"], results["fedadagrad"])


class NumpyScaffold:
    """Karimireddy et al. (2020) Alg. 1, option II; c_i held by the clients, c by the server."""

    def __init__(self, num_clients, local_lr, global_lr):
        self.N, self.eta_l, self.eta_g = num_clients, local_lr, global_lr
        self.c, self.c_i = None, {}

    def round(self, x, clients, weighted):
        zero = {n: np.zeros_like(v) for n, v in x.items()}
        c = self.c or zero
        sizes = np.array([n for _, _, n, _ in clients], dtype=np.float64)
        w = sizes / sizes.sum() if weighted else np.full(len(clients), 1.0 / len(clients))
        delta_c = []
        for cid, y, _, K in clients:
            old = self.c_i.get(cid, zero)
            new = {n: old[n] - c[n] + (x[n] - y[n]) / (K * self.eta_l) for n in x}  # option II
            delta_c.append({n: new[n] - old[n] for n in x})
            self.c_i[cid] = new
        x_new = {n: x[n] + self.eta_g * sum(wk * (y[n] - x[n]) for wk, (_, y, _, _) in zip(w, clients)) for n in x}
        # c <- c + |S|/N * (1/|S|) sum_i dc_i
        self.c = {n: c[n] + len(clients) / self.N * np.mean([d[n] for d in delta_c], axis=0) for n in x}
        return x_new


@pytest.mark.parametrize("weighted", [False, True])
def test_scaffold_matches_option_two(weighted):
    rng = np.random.default_rng(3)
    N, eta_l = 6, 0.05
    x = {n: rng.standard_normal(s) for n, s in SHAPES.items()}
    ref = NumpyScaffold(N, eta_l, global_lr=1.0)
    rule = make_rule("scaffold", num_clients=N, local_lr=eta_l, weighted=weighted)
    assert isinstance(rule, ScaffoldRule)
    current = tensors(x)
    for _ in range(5):
        clients = random_round(rng, x, N, scale=0.2)
        down = rule.down(current)
        for name in x:  # what the server sends: x and c
            np.testing.assert_allclose(down[CONTROL_PREFIX + name].numpy(),
                                       (ref.c or {name: np.zeros_like(x[name])})[name], rtol=1e-10, atol=1e-12)
        updates = []
        for k, y, n, steps in clients:
            sent = rule.upload(k, current, tensors(y), steps)
            assert set(sent) == set(y) | {DELTA_CONTROL_PREFIX + name for name in y}
            updates.append(ClientUpdate(k, sent, n, steps))
        current = rule.aggregate(current, updates)
        x = ref.round(x, clients, weighted)
        for name in x:
            np.testing.assert_allclose(current[name].numpy(), x[name], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(rule.control[name].numpy(), ref.c[name], rtol=1e-10, atol=1e-12)
            for cid, ci in ref.c_i.items():
                np.testing.assert_allclose(rule.client_control[cid][name].numpy(), ci[name], rtol=1e-10, atol=1e-12)
    # c stays the mean of all N client control variates (clients never sampled hold zeros)
    for name in x:
        mean_ci = sum(ref.c_i.get(k, {name: 0.0})[name] for k in range(N)) / N
        np.testing.assert_allclose(rule.control[name].numpy(), mean_ci, rtol=1e-9, atol=1e-12)


def tiny_setup():
    model = PromptedClassifier(tiny_backbone("bert").model, "linear", 2, 2, seed=1)
    ids = [[101, 2204 + i, 3185, 102] for i in range(6)]
    data = EncodedDataset(ids, np.zeros(6, dtype=np.int64), np.array([0, 1] * 3), pad_id=0)
    return model, data


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_scaffold_client_correction(optimizer):
    """One local step: y_corrected - y_plain = -eta_l (c - c_k) exactly.

    With SGD (no clipping, no decay) that is Alg. 1's y - eta_l (g + c - c_k); with AdamW the same
    correction is applied to the optimiser's update.
    """
    model, data = tiny_setup()
    start = model.trainable_state()
    names = list(start)
    gen = torch.Generator().manual_seed(0)
    rule = ScaffoldRule(num_clients=4, local_lr=0.5)
    rule.control = {n: torch.randn(t.shape, generator=gen) for n, t in start.items()}
    rule.client_control[2] = {n: torch.randn(t.shape, generator=gen) for n, t in start.items()}
    cfg = LocalTrainConfig(epochs=1, batch_size=6, lr=0.5, weight_decay=0.0, max_grad_norm=0.0, optimizer=optimizer)

    def one_step(corrected: bool):
        model.load_trainable(start)
        torch.manual_seed(5)
        if corrected:
            with rule.client(SimpleNamespace(model=model), 2, start) as extra:
                assert extra is None
                local_train(model, data, np.arange(6), cfg, np.random.default_rng(5))
        else:
            local_train(model, data, np.arange(6), cfg, np.random.default_rng(5))
        return model.trainable_state()

    plain, corrected, after = one_step(False), one_step(True), one_step(False)
    for n in names:
        expected = -0.5 * (rule.control[n] - rule.client_control[2][n])
        torch.testing.assert_close(corrected[n] - plain[n], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(after[n], plain[n])  # hooks are removed after the client's round


def test_fedprox_gradient_is_mu_times_distance():
    model, _ = tiny_setup()
    anchor = model.trainable_state()
    rule = FedProxRule(mu=0.3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    with rule.client(None, 0, anchor) as prox:
        loss = prox(model)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    for g in grads:
        torch.testing.assert_close(g, torch.full_like(g, 0.3 * 0.1))


def test_moon_term_pulls_towards_the_global_model():
    model, data = tiny_setup()
    model.train()
    glob = model.trainable_state()
    prev = {n: t + 0.3 * torch.randn_like(t) for n, t in glob.items()}
    sim = SimpleNamespace(model=model, clients={0: SimpleNamespace(params=glob), 1: SimpleNamespace(params=prev)})
    batch = next(data.batches(np.arange(6), 6))
    rule = MoonRule(mu=2.0, temperature=0.5)
    with rule.client(sim, 0, glob) as con:  # previous local model == global: the term is mu * log 2
        model.eval()
        model(**batch)
        assert float(con(model)) == pytest.approx(2.0 * np.log(2.0), rel=1e-5)
    model.load_trainable(prev)
    with rule.client(sim, 1, glob) as con:  # at the previous local model: z == z_prev, far from z_glob
        model(**batch)
        at_prev = float(con(model))
    model.load_trainable(glob)
    with rule.client(sim, 1, glob) as con:  # at the global model: z == z_glob
        model(**batch)
        at_glob = float(con(model))
    assert at_glob < 2.0 * np.log(2.0) < at_prev
    assert model.training is False  # the reference passes restore the mode they found
