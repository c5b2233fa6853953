"""Run one experiment per process (so peak memory is that run's own) and collect its results."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

TASKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tasks"


def child(overrides: list[str]) -> None:
    from fedpeptao.config import load_config
    from fedpeptao.sim.simulator import Simulation

    sim = Simulation(load_config(None, overrides + ["progress=false"]))
    history = sim.run()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = sim.summary()
    print("RESULT " + json.dumps({"history": history, "summary": summary, "peak_mb": peak_mb,
                                  "selection": summary.get("selection")}))


def launch(overrides: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *overrides], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark run failed:\n{proc.stderr[-3000:]}")


if __name__ == "__main__":
    child(sys.argv[1:])
