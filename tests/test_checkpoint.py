"""Checkpoints: a State (named tensors + JSON) round trips exactly; damage is detected and falls
back; writes are crash-safe; old checkpoints are pruned."""

from __future__ import annotations

import json
import logging
import math
import os
import random

import numpy as np
import pytest
import torch

from fedpeptao.core.federation import ClientState
from fedpeptao.utils import checkpoint as ckpt
from fedpeptao.utils.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from fedpeptao.utils.state import add_prefix, join, restore_rng_state, rng_state, split, take_prefix


def adamw_after_steps(steps: int = 2) -> tuple[torch.nn.Parameter, torch.optim.AdamW]:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([p], lr=4e-2, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        (p ** 2).sum().backward()
        opt.step()
    return p, opt


def run_state():
    """A checkpoint's sections as a run composes them: an algorithm, two clients sharing a tensor, RNGs."""
    p, opt = adamw_after_steps()
    shared = torch.randn(2, 3)
    params = {"layer.0": torch.randn(5, 2, 4), "head": torch.arange(6, dtype=torch.bfloat16),
              "flags": torch.tensor([True, False]), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4)}
    algorithm = ({**add_prefix("params", params), **add_prefix("momentum", {"layer.0": torch.ones(5, 2, 4)})},
                 {"shared": ["layer.0", "head"], "round": 7, "server_lr": 0.0495, "lr_history": [0.05, 0.0495],
                  "layers": [3, 1, 4], "not_finite": [math.nan, math.inf, -math.inf], "none": None})
    clients = {"0": ClientState({"w": shared, "v": p.detach()}, opt.state_dict(), 2,
                                {"c": torch.zeros(2), "base_version": 1}).state(),
               "1": ClientState({"w": shared}).state()}
    return {"algorithm": algorithm, "clients": join(clients), "engine": rng_state(np.random.default_rng(11))}


def assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, path


def test_state_round_trips_through_a_checkpoint(tmp_path):
    sections = run_state()
    tensors, meta = join(sections)
    save_checkpoint(tmp_path, 7, tensors, meta)
    r, loaded_tensors, loaded_meta = load_latest_checkpoint(tmp_path)
    assert r == 7
    assert list(loaded_tensors) == list(tensors)  # names, and their order, as saved
    assert_same(tensors, loaded_tensors)
    assert_same(json.loads(json.dumps(meta)), loaded_meta)  # the JSON part as JSON reads it
    back = split((loaded_tensors, loaded_meta))
    assert list(back) == ["algorithm", "clients", "engine"]
    assert_same(take_prefix(sections["algorithm"][0], "params"), take_prefix(back["algorithm"][0], "params"))
    clients = {k: ClientState.from_state(*s) for k, s in split(back["clients"]).items()}
    assert clients["0"].rounds_trained == 2 and clients["0"].algo_state["base_version"] == 1
    assert torch.equal(clients["0"].algo_state["c"], torch.zeros(2)) and clients["1"].optimizer is None
    # clients that share one tensor object are stored once and come back sharing it
    assert clients["0"].params["w"] is clients["1"].params["w"]
    body = json.loads((tmp_path / "checkpoints" / "round-00007" / "state.json").read_text())
    assert body["same_as"] == {"clients/1/params/w": "clients/0/params/w"}


def test_restored_adamw_continues_exactly(tmp_path):
    p, opt = adamw_after_steps()
    tensors, meta = ClientState({"p": p.detach()}, opt.state_dict()).state()
    save_checkpoint(tmp_path, 1, tensors, meta)
    _, t, m = load_latest_checkpoint(tmp_path)
    back = ClientState.from_state(t, m)
    q = torch.nn.Parameter(back.params["p"].clone())
    opt2 = torch.optim.AdamW([q], lr=1.0, weight_decay=0.0)  # hyper-parameters must come from the checkpoint
    opt2.load_state_dict(back.optimizer)
    assert opt2.param_groups[0]["lr"] == 4e-2 and opt2.param_groups[0]["betas"] == (0.9, 0.999)
    for o, w in ((opt, p), (opt2, q)):
        o.zero_grad()
        (w ** 2).sum().backward()
        o.step()
    assert torch.equal(p, q)


def test_rng_states_restore_every_stream(tmp_path):
    gen = np.random.default_rng(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's global state
    tensors, meta = rng_state(gen)
    save_checkpoint(tmp_path, 1, tensors, meta)
    first = (random.random(), np.random.rand(), np.random.standard_normal(), gen.integers(1 << 30), torch.rand(2))
    _, t, m = load_latest_checkpoint(tmp_path)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    gen2 = np.random.default_rng(12345)
    restore_rng_state((t, m), gen2)
    again = (random.random(), np.random.rand(), np.random.standard_normal(), gen2.integers(1 << 30), torch.rand(2))
    assert first[:4] == again[:4] and torch.equal(first[4], again[4])


def test_what_is_neither_a_tensor_nor_json_is_refused_not_pickled(tmp_path):
    class Custom:
        pass

    for bad in ({"x": Custom()}, {"x": {1, 2}}, {"x": torch.zeros(2)}):
        with pytest.raises(CheckpointError, match="JSON part"):
            save_checkpoint(tmp_path, 1, {}, bad)
    with pytest.raises(CheckpointError, match="tensor 'x' is a list"):
        save_checkpoint(tmp_path, 1, {"x": [1.0]}, {})
    assert list_checkpoints(tmp_path) == [] and not any((tmp_path / "checkpoints").iterdir())


def test_sections_join_and_split_by_name():
    state = join({"a": ({"x": torch.ones(1), "y/z": torch.zeros(1)}, {"k": 1}), "b": ({}, {})})
    assert list(state[0]) == ["a/x", "a/y/z"] and state[1] == {"a": {"k": 1}, "b": {}}
    back = split(state)
    assert list(back["a"][0]) == ["x", "y/z"] and back["b"] == ({}, {})
    with pytest.raises(ValueError, match="no section"):
        split(({"c/x": torch.ones(1)}, {"a": {}}))
    with pytest.raises(ValueError, match="must not contain"):
        join({"a/b": ({}, {})})


def test_aliased_tensors_can_be_saved(tmp_path):
    base = torch.arange(12.0)
    save_checkpoint(tmp_path, 0, {"a": base[:6], "b": base[6:], "c": base}, {})
    _, t, _ = load_latest_checkpoint(tmp_path)
    assert torch.equal(t["c"], base) and torch.equal(t["b"], base[6:])


def test_layout_keep_and_no_leftovers(tmp_path):
    for r in range(6):
        save_checkpoint(tmp_path, r, {"x": torch.full((2,), float(r))}, {"r": r}, keep=3)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["round-00003", "round-00004", "round-00005"]
    assert sorted(p.name for p in (root / "round-00005").iterdir()) == ["state.json", "tensors.safetensors"]
    body = json.loads((root / "round-00005" / "state.json").read_text())
    assert len(body["tensors_sha256"]) == 64 and len(body["body_sha256"]) == 64 and body["round"] == 5
    assert body["version"] == 2 and body["tensors"] == ["x"] and body["state"] == {"r": 5}
    # saving an earlier round (after a resume) drops the later, abandoned ones
    save_checkpoint(tmp_path, 4, {"x": torch.zeros(2)}, {"again": True}, keep=3)
    assert [r for r, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert load_latest_checkpoint(tmp_path)[2] == {"again": True}


def _two_checkpoints(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(64)}, {"round": 1})
    newest = save_checkpoint(tmp_path, 2, {"x": torch.full((64,), 2.0)}, {"round": 2, "lr": 0.05})
    return newest


def _truncate(d):
    f = d / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:-40])


def _flip_byte(d):
    f = d / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # inside the tensor data: the file still parses, only the checksum can tell
    f.write_bytes(bytes(data))


def _edit_meta(d):
    f = d / "state.json"
    f.write_text(f.read_text().replace('"lr": 0.05', '"lr": 0.5'))


def _garble_meta(d):
    f = d / "state.json"
    f.write_text(f.read_text()[:30])


def _delete_tensors(d):
    (d / "tensors.safetensors").unlink()


@pytest.mark.parametrize(("damage", "words"), [
    (_truncate, "truncated"), (_flip_byte, "tensors.safetensors checksum"), (_edit_meta, "state.json checksum"),
    (_garble_meta, "not valid JSON"), (_delete_tensors, "missing"),
])
def test_damage_is_detected_and_falls_back(tmp_path, caplog, damage, words):
    newest = _two_checkpoints(tmp_path)
    damage(newest)
    with pytest.raises(CheckpointError, match=words) as info:
        load_checkpoint(newest)
    assert str(newest) in str(info.value)
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        r, t, meta = load_latest_checkpoint(tmp_path)
    assert r == 1 and meta == {"round": 1} and torch.equal(t["x"], torch.ones(64))
    assert any("round-00002" in rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING)


def test_no_valid_checkpoint_raises_naming_each(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints"):
        load_latest_checkpoint(tmp_path)
    newest = _two_checkpoints(tmp_path)
    _flip_byte(newest)
    _truncate(tmp_path / "checkpoints" / "round-00001")
    with pytest.raises(CheckpointError) as info:
        load_latest_checkpoint(tmp_path)
    assert "round-00001" in str(info.value) and "round-00002" in str(info.value)


def test_crash_at_the_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(3)}, {"ok": 1})

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 2, {"x": torch.zeros(3)}, {"ok": 2})
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round-00001"]
    r, t, meta = load_latest_checkpoint(tmp_path)
    assert r == 1 and meta == {"ok": 1} and torch.equal(t["x"], torch.ones(3))


def test_crash_while_writing_tensors_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(3)}, {"ok": 1})

    def half_write(tensors, filename):
        with open(filename, "wb") as fh:
            fh.write(b"\x10\x00\x00")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"x": torch.zeros(3)}, {"ok": 2})
    monkeypatch.undo()
    assert load_latest_checkpoint(tmp_path)[0] == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round-00001"]


def test_failed_replacement_of_the_same_round_keeps_the_old_one(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 3, {"x": torch.ones(3)}, {"v": "old"})
    real = os.replace
    calls = []

    def fail_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old one has been set aside; the new one fails to move in
            raise OSError("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", fail_second)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 3, {"x": torch.zeros(3)}, {"v": "new"})
    monkeypatch.undo()
    assert load_latest_checkpoint(tmp_path)[2] == {"v": "old"}
    save_checkpoint(tmp_path, 3, {"x": torch.zeros(3)}, {"v": "new"})
    assert load_latest_checkpoint(tmp_path)[2] == {"v": "new"}


def test_leftovers_of_a_killed_save_are_ignored_then_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, {"x": torch.ones(3)}, {"ok": 1})
    root = tmp_path / "checkpoints"
    junk = root / ".tmp-round-00002-deadbeef"
    junk.mkdir()
    (junk / "tensors.safetensors").write_bytes(b"partial")
    # a checkpoint set aside for replacement when the process died: put back on the next save
    os.replace(root / "round-00001", root / ".old-round-00001-cafebabe")
    with pytest.raises(CheckpointError):
        load_latest_checkpoint(tmp_path)
    save_checkpoint(tmp_path, 2, {"x": torch.zeros(3)}, {"ok": 2})
    assert sorted(p.name for p in root.iterdir()) == ["round-00001", "round-00002"]
    assert load_checkpoint(root / "round-00001")[2] == {"ok": 1}


def test_meta_with_int_keys_and_tuples_verifies(tmp_path):
    save_checkpoint(tmp_path, 0, {}, {"by_client": {10: 1.0, 9: 2.0}, "pair": (1, 2)})
    assert load_latest_checkpoint(tmp_path)[2] == {"by_client": {"10": 1.0, "9": 2.0}, "pair": [1, 2]}


def test_a_checkpoint_of_the_old_format_is_refused_in_one_line(tmp_path):
    """Format 1 (``meta.json`` + ``state.safetensors``, a type-tagged codec) is not read any more."""
    old = tmp_path / "checkpoints" / "round-00002"
    old.mkdir(parents=True)
    (old / "meta.json").write_text(json.dumps({"format": "fedpeptao-checkpoint", "version": 1, "round": 2}))
    (old / "state.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="checkpoint format 1") as info:
        load_latest_checkpoint(tmp_path)
    assert "\n" not in str(info.value) and "start the run again" in str(info.value)
