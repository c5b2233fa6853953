"""The ServerApp: read the experiment, run the strategy, write the results.

The ServerApp never loads the language model or any data: the initial tensors, the names of the
tuning's tensors, the clients' task results and the evaluation counts all come from the clients.
What it writes mirrors the embedded simulator's run directory: ``config.yaml``, ``metrics.jsonl``,
``checkpoints/``, ``global.safetensors`` (every trainable tensor the server holds) and
``summary.json``. Restarted with the same run config, it continues from its newest checkpoint.
"""

from __future__ import annotations

import json
import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from fedpeptao.config import ConfigError, save_config
from fedpeptao.flower.logs import route_to_flower
from fedpeptao.flower.settings import ServerSettings
from fedpeptao.flower.strategy import FederatedStrategy
from fedpeptao.utils.checkpoint import list_checkpoints

log = logging.getLogger("fedpeptao.flower.server")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    route_to_flower()
    try:
        settings = ServerSettings.from_run_config(context.run_config, context.run_id)
    except (ConfigError, ValueError, OSError) as exc:  # OSError: the config file unreadable (permissions)
        # One line naming the key, as the command line prints it, and the ServerApp ends. Raised, it
        # would reach the user as Flower's traceback and "An unhandled exception occurred in the
        # ServerApp"; a SystemExit would skip Flower's exit handlers, which upload this line to
        # `flwr log` / `flwr run --stream`. Nothing has been sent to a node or written yet.
        log.error("%s%s", "config error: " if isinstance(exc, ConfigError) else "error: ", exc)
        return
    cfg = settings.experiment
    run_dir = settings.output_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    resuming = bool(list_checkpoints(settings.checkpoint_dir))
    if not resuming and any(p.name != "checkpoints" for p in run_dir.iterdir()):
        raise FileExistsError(f"output directory {run_dir} is not empty and holds no checkpoint to continue; set run "
                              f"config 'output-dir' or run_name")
    strategy = FederatedStrategy(cfg, timeout=settings.round_timeout, min_replies=settings.min_replies,
                                 run_dir=run_dir, checkpoint_dir=settings.checkpoint_dir)
    strategy.setup(grid, settings.min_nodes, settings.node_wait_timeout)  # refuses another config's checkpoint
    save_config(cfg, run_dir / "config.yaml")
    if strategy.remaining_rounds() > 0:
        strategy.start(grid, initial_arrays=strategy.global_arrays(), num_rounds=strategy.remaining_rounds(),
                       timeout=settings.round_timeout)
    strategy.finish(grid)
    save_file({name: t.contiguous() for name, t in strategy.algorithm.params.items()},
              str(run_dir / "global.safetensors"))
    (run_dir / "summary.json").write_text(json.dumps(strategy.run_summary(), indent=2))
    log.info("%s run finished; results in %s", cfg.describe(), run_dir)
