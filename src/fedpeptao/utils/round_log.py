"""Per-round metrics: one JSON line per round in ``metrics.jsonl``, optionally mirrored to TensorBoard.

A row's ``round`` is the global round as users read it everywhere, from 1 (round 1: after the
first round of training); it is also the row's TensorBoard step.

The JSONL file is the source of truth (reports and resume read it); TensorBoard is a live view for
people who already watch their runs there. Both runtimes (simulator and Flower strategy) write
through :class:`RoundLog`, so the two files never disagree on what a round row holds.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Row keys worth a TensorBoard curve; the rest (lists, ids, counters) stay in the JSONL only.
SCALARS = ("accuracy", "metric", "eval_loss", "val_accuracy", "val_metric", "train_loss", "bytes_up", "bytes_down",
           "total_bytes", "slowest_client_s", "train_time_s", "elapsed_s", "phase_s", "epsilon")
#: Row keys that measure wall time: they differ between two runs of the same experiment.
TIMING = frozenset({"slowest_client_s", "train_time_s", "elapsed_s", "phase_s"})


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def close_row(row: dict[str, Any], previous: Mapping[str, Any], elapsed_s: float) -> dict[str, Any]:
    """Add the running totals to a finished round's row: training time (the slowest client of each
    round, SPEC section 4), bytes up + down, wall seconds since the run started."""
    row["train_time_s"] = previous.get("train_time_s", 0.0) + row.get("slowest_client_s", 0.0)
    row["total_bytes"] = previous.get("total_bytes", 0) + row.get("bytes_up", 0) + row.get("bytes_down", 0)
    row["elapsed_s"] = elapsed_s
    return row


class RoundLog:
    """Appends round rows to ``run_dir/metrics.jsonl`` (and ``run_dir/tensorboard/`` when asked)."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, first_round: int = 1) -> None:
        """``first_round``: the number of the first round this log will write (from 1; a resumed
        run's next round).

        ``tensorboard=True`` assumes the config validated that the package is installed.
        """
        self.path = Path(run_dir) / "metrics.jsonl"
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops the events of rounds a resumed run is about to train again
            purge = first_round if first_round > 1 else None
            self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def write(self, row: Mapping[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._writer is not None:
            step = int(row["round"])
            for key in SCALARS:
                value = row.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"round/{key}", value, step)
            self._writer.flush()

    def rewrite(self, rows: list[Mapping[str, Any]]) -> None:
        """Replace the file with ``rows`` atomically (resume drops rows past its checkpoint)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


__all__ = ["SCALARS", "TIMING", "RoundLog", "close_row", "tensorboard_available"]
