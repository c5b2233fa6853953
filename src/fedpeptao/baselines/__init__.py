"""Baselines of the paper (SPEC section 5), run the same way as FedPepTAO for a fair comparison.

- :mod:`~fedpeptao.baselines.methods`: the registry (``METHODS``) and :class:`BaselineSimulation`,
  a :class:`~fedpeptao.sim.simulator.Simulation` whose model construction, client hooks and
  server rule are swapped while data, partition, seed, client sampling, evaluation and metrics
  stay the simulator's own code;
- :mod:`~fedpeptao.baselines.prompts`: input prompt tuning (FedPrompt, via PEFT), late prompt
  tuning (LPT), IDPG and ATTEMPT;
- :mod:`~fedpeptao.baselines.peft_methods`: LoRA (PEFT) and bottleneck adapters;
- :mod:`~fedpeptao.baselines.optimizers`: FedAvg, FedProx, SCAFFOLD, MOON, FedAdam, FedYogi, FedAdagrad;
- :mod:`~fedpeptao.baselines.compare`: ``fedpeptao compare`` (table and plots).

Importing this package is cheap; the submodules import torch and transformers.
"""
