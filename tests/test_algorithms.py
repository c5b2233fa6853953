"""The algorithm protocol: server rules against NumPy references, messages and their extras, a population's
mean, and a package without import cycles."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeptao.algorithms import make_algorithm
from fedpeptao.algorithms.base import ServerContext
from fedpeptao.algorithms.fedavg import FedAvgSettings
from fedpeptao.algorithms.fedopt import fedopt_update
from fedpeptao.algorithms.fedpeptao import POPULATION, step_clients
from fedpeptao.algorithms.fedpeptao.settings import FedPepTAOSettings
from fedpeptao.algorithms.scaffold import (CONTROL, DELTA_CONTROL, ScaffoldSettings, scaffold_client_control,
                                          scaffold_server)
from fedpeptao.core.aggregation import ClientUpdate, PopulationUpdate, averaging
from fedpeptao.core.payload import Message, flatten, message_bytes

SRC = Path(__file__).resolve().parents[1] / "src" / "fedpeptao"


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_fedopt_update_matches_numpy(kind):
    rng = np.random.default_rng(0)
    x, d, m, v = (rng.standard_normal(5) for _ in range(4))
    v = np.abs(v)
    m_ref = 0.9 * m + 0.1 * d
    v_ref = {"adam": 0.99 * v + 0.01 * d * d, "adagrad": v + d * d,
             "yogi": v - 0.01 * d * d * np.sign(v - d * d)}[kind]
    x_ref = x + 0.01 * m_ref / (np.sqrt(v_ref) + 1e-3)
    got = fedopt_update(*(torch.from_numpy(a) for a in (x, d, m, v)), kind, 0.01, 0.9, 0.99, 1e-3)
    for a, b in zip(got, (x_ref, m_ref, v_ref)):
        assert np.allclose(a.numpy(), b)


def test_scaffold_rules():
    c_k, c, x, y = torch.zeros(3), torch.ones(3), torch.full((3,), 2.0), torch.ones(3)
    assert torch.allclose(scaffold_client_control(c_k, c, x, y, 4, 0.5), c_k - c + (x - y) / 2.0)
    x_new, c_new = scaffold_server(x, c, [y, y * 3], [torch.ones(3), torch.ones(3)], [0.5, 0.5], 4)
    assert torch.allclose(x_new, x) and torch.allclose(c_new, c + 0.5)


SHARED = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}


def server(settings):
    ctx = ServerContext(num_clients=4, local_lr=0.1, seed=0, rounds=3, layer_groups={0: ["w"]}, head_names=["b"],
                        average=averaging("weighted_mean"))
    return make_algorithm(settings, ctx, dict(SHARED))


def reply(extras) -> ClientUpdate:
    return ClientUpdate(1, dict(SHARED), 5, 2, extras)


def test_scaffold_sends_and_checks_its_own_extras():
    algo = server(ScaffoldSettings())
    message = algo.client_message(0)
    assert message.model.keys() == message.extras[CONTROL].keys() == SHARED.keys() and len(message.extras) == 1
    dc = {n: torch.zeros_like(t) for n, t in SHARED.items()}
    assert algo.extras_problem(reply({DELTA_CONTROL: dc})) is None
    assert "expected ['scaffold.delta_control']" in algo.extras_problem(reply({}))
    assert "shape" in algo.extras_problem(reply({DELTA_CONTROL: {**dc, "w": torch.zeros(3)}}))
    assert "non-finite" in algo.extras_problem(reply({DELTA_CONTROL: {**dc, "b": torch.full((3,), float("nan"))}}))
    with pytest.raises(TypeError, match="sum of the clients. control-variate deltas"):
        algo.aggregate(0, [1], PopulationUpdate(dict(SHARED), 3, 2))


def test_a_reply_without_expected_extras_carries_none():
    algo = server(FedAvgSettings())
    assert algo.extras_problem(reply({})) is None
    assert "expected none" in algo.extras_problem(reply({"other": {"w": torch.zeros(2, 3)}}))


def test_a_population_mean_is_taken_as_released():
    population = PopulationUpdate({"w": torch.ones(2)}, 3, 2)
    for rule in ("weighted_mean", "median", "trimmed_mean"):
        assert averaging(rule)(population) is population.params
    (client,) = step_clients(population)  # FedPepTAO's step: the population as one client of weight one
    assert (client.client_id, client.params, client.num_examples, client.num_steps) == (POPULATION, population.params, 1, 2)
    updates = [ClientUpdate(3, {"w": torch.ones(2)}, 4, 1)]
    assert step_clients(updates) is updates


def test_fedpeptao_on_a_population_mean_follows_its_clients_round_after_round():
    """The population's mean is one client that returns every round; counted as every client, its
    correction stays zero and the step stays with a direction every client agrees on (counted as
    |S| of N it turned against them by the third round: see the algorithm's docstring)."""
    ctx = ServerContext(num_clients=20, local_lr=0.02, seed=0, rounds=8, layer_groups={0: ["w"]}, head_names=["b"],
                        average=averaging("weighted_mean"))
    algo = make_algorithm(FedPepTAOSettings(ratio=1.0, warmup_rounds=0), ctx, dict(SHARED))
    ratios = []
    for t in range(8):
        algo.prepare_round(t, lambda *a, **k: {0: {"scores": [1.0], "num_train": 4}})  # one layer, one score
        x = algo.global_shared()
        moved = {n: v + 6 * 0.02 for n, v in x.items()}  # 6 local steps of lr 0.02 along +1
        algo.aggregate(t, list(range(5)), PopulationUpdate(moved, 5, 6))
        step = {n: algo.global_shared()[n] - x[n] for n in x}
        ratios.append(min(float((d / (6 * 0.02)).min()) for d in step.values()))
    assert all(r > 0.9 for r in ratios), ratios
    assert algo.stability()["first_contact_ratio"] > 1.0  # and the start-up check agrees: no warning


def test_a_message_counts_its_extras_under_their_group():
    message = Message({"w": torch.zeros(4)}, {"scaffold.control": {"w": torch.zeros(4)}})
    assert sorted(flatten(message)) == ["scaffold.control/w", "w"]
    assert message_bytes(message) > message_bytes(Message(message.model)) + 16


def _module_imports(path: Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:  # module level only; TYPE_CHECKING blocks are skipped
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fedpeptao")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedpeptao"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= subs  # `from pkg import submodule` needs the submodule, not pkg/__init__ beyond it
            if len(subs) < len(node.names):
                found.add(node.module)
    return found


def test_no_import_cycles_and_runtimes_apart():
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {m: {i for i in _module_imports(p, set(modules)) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    for a, b in (("fedpeptao.sim", "fedpeptao.flower"), ("fedpeptao.flower", "fedpeptao.sim")):
        assert not any(i.startswith(b) for m, deps in graph.items() if m.startswith(a) for i in deps)
