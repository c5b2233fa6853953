"""Send the package's log records through Flower's own logger.

Flower prints, streams (``flwr run --stream``, ``flwr log``) and stores what its ``flwr`` logger
handles; records of the package's loggers (the round summaries, rejected updates, refused
nodes) would otherwise show only as bare warnings on stderr, and INFO not at all.
"""

from __future__ import annotations

import logging


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
