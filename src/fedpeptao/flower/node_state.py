"""A client's state between rounds on a SuperNode: in ``context.state`` and on the node's disk.

FedPepTAO's unselected prompt layers never leave the device, the device's AdamW moments carry
over between rounds, and a baseline's rule may keep per-device tensors (SCAFFOLD's ``c_k``; MOON's
previous local model is the client's own tensors), so a client that forgot them would silently
become a different algorithm.
Flower keeps ``context.state`` for the life of the SuperNode process; a copy on the node's disk
(crash-safe checkpoints of :mod:`fedpeptao.utils.checkpoint`, keyed by run and client) lets a
restarted SuperNode continue. Each save gets a higher version; loading takes the newest copy.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ConfigRecord, RecordDict

from fedpeptao.core.federation import ClientState
from fedpeptao.flower.records import from_record, to_record
from fedpeptao.utils.checkpoint import (CheckpointError, flatten_state, list_checkpoints, load_latest_checkpoint,
                                        save_checkpoint, unflatten_state)

log = logging.getLogger("fedpeptao.flower.client")

TENSORS_KEY, META_KEY = "fedpeptao.client.tensors", "fedpeptao.client.meta"


@dataclass
class StoredClient:
    """A client's tensors and optimiser state, which warmed-up base its personal layers came from, and
    its baseline rule's own tensors (``FedAvgRule.device_upload``'s state)."""

    state: ClientState
    base_version: int = -1  # -1: the fresh initialisation
    version: int = 0  # save counter; the higher copy wins
    rule_state: dict[str, torch.Tensor] = field(default_factory=dict)


class ClientStore:
    """Load/save one client's :class:`StoredClient`; ``directory=None`` keeps it in memory only."""

    def __init__(self, context_state: RecordDict, directory: Path | None) -> None:
        self.context_state = context_state
        self.directory = directory

    def load(self) -> StoredClient | None:
        candidates = [c for c in (self._from_context(), self._from_disk()) if c is not None]
        return max(candidates, key=lambda c: c.version) if candidates else None

    def save(self, stored: StoredClient) -> None:
        stored.version += 1
        tensors, skeleton = flatten_state({"params": stored.state.params, "optimizer": stored.state.optimizer,
                                           "rounds_trained": stored.state.rounds_trained,
                                           "base_version": stored.base_version, "rule_state": stored.rule_state})
        meta = json.dumps(skeleton)
        self.context_state[TENSORS_KEY] = to_record(tensors)
        self.context_state[META_KEY] = ConfigRecord({"skeleton": meta, "version": stored.version})
        if self.directory is not None:
            save_checkpoint(self.directory, stored.version, tensors, {"state": skeleton}, keep=2)

    def _from_context(self) -> StoredClient | None:
        if TENSORS_KEY not in self.context_state or META_KEY not in self.context_state:
            return None
        meta = self.context_state[META_KEY]
        return _restore(from_record(self.context_state[TENSORS_KEY]), json.loads(str(meta["skeleton"])),
                        int(meta["version"]))

    def _from_disk(self) -> StoredClient | None:
        if self.directory is None or not list_checkpoints(self.directory):
            return None
        try:
            version, tensors, meta = load_latest_checkpoint(self.directory)
        except CheckpointError as exc:
            log.warning("ignoring unusable client state in %s: %s", self.directory, exc)
            return None
        return _restore(tensors, meta["state"], version)


def _restore(tensors, skeleton, version: int) -> StoredClient:
    data = unflatten_state(tensors, skeleton)
    return StoredClient(ClientState(params=data["params"], optimizer=data["optimizer"],
                                    rounds_trained=int(data["rounds_trained"])),
                        base_version=int(data["base_version"]), version=version,
                        rule_state=dict(data.get("rule_state") or {}))
