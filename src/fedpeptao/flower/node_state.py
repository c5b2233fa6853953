"""A client's state between rounds on a SuperNode: in ``context.state`` and on the node's disk.

Personal layers never leave the device, the device's AdamW moments carry over between rounds,
and an algorithm may keep per-device tensors of its own (control variates), so a client
that forgot them would silently become a different algorithm. Flower keeps ``context.state``
for the life of the SuperNode process; copies on the node's disk (crash-safe checkpoints of
:mod:`fedpeptao.utils.checkpoint`, keyed by run and client, one per round the client changed,
named by the global round from 1 as the server's are) let a restarted SuperNode continue, and
let a restarted ServerApp that resumes from an older checkpoint replay a round exactly:
:meth:`ClientStore.load` takes the newest copy from before the round asked for.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from fedpeptao.core.federation import ClientState
from fedpeptao.flower.records import from_record, to_record
from fedpeptao.utils.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint

log = logging.getLogger("fedpeptao.flower.client")

TENSORS_KEY, META_KEY = "fedpeptao.client.tensors", "fedpeptao.client.meta"


@dataclass
class StoredClient:
    """A client's :class:`ClientState` as of the end of round ``round`` (the global round, from
    1; 0: never changed)."""

    state: ClientState
    round: int = 0


class ClientStore:
    """Load/save one client's state; ``directory=None`` keeps it in memory only.

    ``keep`` copies stay on disk: enough to go back to the server's last checkpoint.
    """

    def __init__(self, context_state: RecordDict, directory: Path | None, keep: int = 3) -> None:
        self.context_state = context_state
        self.directory = directory
        self.keep = keep

    def load(self, before: int) -> StoredClient | None:
        """The newest state from before the round of index ``before`` (from 0) ran: saved at the
        end of round ``before`` or earlier, as rounds are numbered from 1 (None: the client
        starts fresh)."""
        stored = self._from_context()
        if stored is not None and stored.round <= before:
            return stored
        if self.directory is None:
            return None
        for number, path in reversed(list_checkpoints(self.directory)):
            if number > before:
                continue
            try:
                _, tensors, meta = load_checkpoint(path)
            except CheckpointError as exc:
                log.warning("ignoring unusable client state in %s: %s", path, exc)
                continue
            return StoredClient(ClientState.from_state(tensors, meta), number)
        return None

    def save(self, stored: StoredClient) -> None:
        tensors, meta = stored.state.state()
        self.context_state[TENSORS_KEY] = to_record(tensors)
        self.context_state[META_KEY] = ConfigRecord({"state": json.dumps(meta), "round": stored.round})
        if self.directory is not None:  # a later round's copy belongs to an abandoned timeline and goes
            save_checkpoint(self.directory, stored.round, tensors, meta, keep=self.keep)

    def _from_context(self) -> StoredClient | None:
        if TENSORS_KEY not in self.context_state or META_KEY not in self.context_state:
            return None
        meta = self.context_state[META_KEY]
        state = ClientState.from_state(from_record(self.context_state[TENSORS_KEY]), json.loads(str(meta["state"])))
        return StoredClient(state, int(meta["round"]))
