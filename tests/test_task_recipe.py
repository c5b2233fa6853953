"""Recipe from docs/architecture.md, as a test: a new task (a readout of the first token, as BERT's
``[CLS]`` classifiers do) in a few lines, run with two tunings that were not touched for it."""

from __future__ import annotations

import torch
from torch import nn

from fedpeptao.config import ConfigError, load_config
from fedpeptao.sim.simulator import Simulation
from fedpeptao.tasks import Batch, Output, register_task
from fedpeptao.tasks.base import classification_output
from fedpeptao.tasks.classification import LinearHead


# -- recipe: a new task (a linear head, as `linear` trains, on the first token's last hidden state) ---
@register_task
class FirstTokenHead(LinearHead):
    name = "first_token"

    def output(self, out, head: nn.Linear, backbone: nn.Module, batch: Batch) -> Output:
        first = out.last_hidden_state[:, 0]
        logits = head(first.to(head.weight.dtype))
        return classification_output(logits, logits, batch.labels, first if batch.features else None)
# -- end of recipe ---------------------------------------------------------------------------------


def _run(task_dir, *extra: str) -> Simulation:
    sim = Simulation(load_config(None, [
        "model.name=tiny-bert", f"data.task={task_dir}", "model.max_length=24", "federated.num_clients=3",
        "federated.clients_per_round=2", "federated.rounds=2", "progress=false", *extra]))
    sim.run()
    return sim


def test_a_new_task_runs_with_untouched_tunings_and_reads_what_it_says(task_dir):
    for tuning in ("deep_prompt", "lora"):
        sim = _run(task_dir, "model.head=first_token", f"tuning.name={tuning}", "method.name=fedavg")
        model = sim.model
        assert isinstance(model.task, FirstTokenHead) and model.head_names() == ["head.weight", "head.bias"]
        assert not torch.equal(sim.algorithm.params["head.weight"], sim.fed.initial["head.weight"])  # it trained
        assert all(0.0 <= row["accuracy"] <= 1.0 for row in sim.history)
        # the logits are the head applied to the first token's last hidden state, as the recipe says
        batch = next(sim.fed.eval_data.batches(torch.arange(2).numpy(), 2))
        model.eval()
        with torch.no_grad():
            ref = model(**batch).logits
            direct = model.head(model.encode(batch["input_ids"], batch["attention_mask"]).last_hidden_state[:, 0])
        torch.testing.assert_close(ref, direct)


def test_an_unknown_task_is_one_line_naming_the_key():
    try:
        load_config(None, ["model.head=regression"])
    except ConfigError as error:
        assert str(error).startswith("model.head") and "first_token" in str(error) and "\n" not in str(error)
    else:
        raise AssertionError("model.head=regression was accepted")
