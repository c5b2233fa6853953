"""Send the package's log records through Flower's own logger, with the run's round numbers.

Flower prints, streams (``flwr run --stream``, ``flwr log``) and stores what its ``flwr`` logger
handles; records of the package's loggers (the round summaries, rejected updates, refused
nodes) would otherwise show only as bare warnings on stderr, and INFO not at all.

Flower's ``Strategy.start`` numbers the rounds of one call from 1 (``[ROUND 1/2]``), so a
ServerApp resumed after round 3 of 5 would print ``[ROUND 1/2]`` for round 4.
:func:`global_round_numbers` rewrites that one record's arguments to the run's global round and
total (``[ROUND 4/5]``), the numbers of ``metrics.jsonl``, the checkpoints and our own lines.
A filter on that record, rather than a copy of Flower's round loop, keeps Flower's loop (its
evaluation hooks, results and timeouts) Flower's own; should Flower reword the line, it is simply
left as Flower writes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

#: the format of Flower's per-round console line (``flwr.serverapp.strategy.Strategy.start``)
ROUND_LINE = "[ROUND %s/%s]"


def route_to_flower() -> None:
    """Attach Flower's handlers to the package logger at INFO (idempotent).

    Propagation to the root logger is left on, so whatever the host process configured still works.
    """
    ours, flower = logging.getLogger("fedpeptao"), logging.getLogger("flwr")
    for handler in flower.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    if ours.level == logging.NOTSET or ours.level > logging.INFO:
        ours.setLevel(logging.INFO)


class GlobalRounds(logging.Filter):
    """Shows Flower's ``[ROUND n/N]`` of a start that continues after ``done`` rounds as
    ``[ROUND done+n/total]``; every other record passes unchanged."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__()
        self.done, self.total = done, total

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == ROUND_LINE and isinstance(record.args, tuple) and len(record.args) == 2:
            record.args = (self.done + int(record.args[0]), self.total)
        return True


@contextmanager
def global_round_numbers(done: int, total: int) -> Iterator[None]:
    """While inside, Flower's round lines count the run's rounds (``done`` of ``total`` done before)."""
    flower = logging.getLogger("flwr")
    rounds = GlobalRounds(done, total)
    flower.addFilter(rounds)
    try:
        yield
    finally:
        flower.removeFilter(rounds)
