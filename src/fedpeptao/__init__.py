"""FedPepTAO: federated deep prompt tuning with layer selection and adaptive optimisation.

``fedpeptao.load_run(run_dir, client=None | k)`` loads what a run trained (see
:mod:`fedpeptao.trained`); it is imported on first use, so importing the package stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["load_run"]


def __getattr__(name: str):
    if name == "load_run":
        from fedpeptao.trained import load_run  # noqa: PLC0415

        return load_run
    raise AttributeError(f"module 'fedpeptao' has no attribute {name!r}")
