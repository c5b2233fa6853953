"""The FedPepTAO ServerApp: read the experiment, run the strategy, write the results.

The ServerApp never loads the language model or any data: the initial tensors, the layer scores
and the evaluation counts all come from the clients. What it writes mirrors the embedded
simulator's run directory: ``config.yaml``, ``selection.json``, ``metrics.jsonl``,
``global.safetensors`` (every trainable tensor the server holds) and ``summary.json``.
"""

from __future__ import annotations

import json
import logging

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from fedpeptao.config import save_config
from fedpeptao.flower.logs import route_to_flower
from fedpeptao.flower.settings import ServerSettings
from fedpeptao.flower.strategy import FedPepTAOStrategy

log = logging.getLogger("fedpeptao.flower.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    route_to_flower()
    settings = ServerSettings.from_run_config(context.run_config, context.run_id)
    cfg = settings.experiment
    run_dir = settings.output_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if any(run_dir.iterdir()):
        raise FileExistsError(f"output directory {run_dir} is not empty; set run config 'output-dir' or run_name")
    save_config(cfg, run_dir / "config.yaml")
    strategy = FedPepTAOStrategy(cfg, method=settings.method, timeout=settings.round_timeout,
                                 min_replies=settings.min_replies, run_dir=run_dir)
    strategy.setup(grid, settings.min_nodes, settings.node_wait_timeout)
    strategy.start(grid, initial_arrays=strategy.global_arrays(), num_rounds=cfg.federated.rounds,
                   timeout=settings.round_timeout)
    strategy.finish(grid)
    agg = strategy.aggregator
    save_file({name: t.contiguous() for name, t in agg.params.items()}, str(run_dir / "global.safetensors"))
    (run_dir / "summary.json").write_text(json.dumps(summarise(strategy), indent=2))
    log.info("%s run finished; results in %s", strategy.method.name, run_dir)


def summarise(strategy: FedPepTAOStrategy) -> dict:
    """The simulator's headline numbers, from the strategy's per-round history.

    ``algorithm`` is what the simulator's summary says (a baseline's name, else ``cfg.algorithm``);
    ``method`` is the method run (an ablation's name included).
    """
    history, cfg, method = strategy.history, strategy.cfg, strategy.method
    evaluated = [row for row in history if "metric" in row]
    best = max(evaluated, key=lambda r: r["metric"]) if evaluated else None
    target = cfg.federated.target_accuracy
    reached = next((r for r in evaluated if target is not None and r["metric"] >= target), None)
    return {
        "runtime": "flower", "algorithm": cfg.algorithm if method.native else method.name,
        "method": method.name, "model": cfg.model.name, "task": cfg.data.task,
        "metric": strategy.metric, "clients": sorted(strategy.clients),
        "final_metric": evaluated[-1]["metric"] if evaluated else None,
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "best_metric": best["metric"] if best else None, "best_round": best["round"] if best else None,
        "target": target, "rounds_to_target": None if reached is None else reached["round"] + 1,
        "seconds_to_target": None if reached is None else reached["train_time_s"],
        "total_mb": history[-1]["total_bytes"] / 1e6 if history else 0.0,
        "elapsed_s": history[-1]["elapsed_s"] if history else 0.0,
        "failed_client_rounds": int(np.sum([len(r["failed"]) for r in history])),
        "shared_layers": None if strategy.selection is None else strategy.selection["layers"],
    }
