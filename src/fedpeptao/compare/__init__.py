"""``fedpeptao compare``: the paper's methods as presets of (algorithm, tuning), run side by side
on one partition, seed and budget (:mod:`~fedpeptao.compare.presets`, :mod:`~fedpeptao.compare.runner`),
optionally repeated over seeds with intervals and cost to target (:mod:`~fedpeptao.compare.seeds`)."""
