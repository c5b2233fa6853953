"""The algorithm protocol: server rules against NumPy references, and a package without import cycles."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeptao.algorithms.fedopt import fedopt_update
from fedpeptao.algorithms.scaffold import scaffold_client_control, scaffold_server

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
