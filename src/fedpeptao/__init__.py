"""FedPepTAO: federated deep prompt tuning with layer selection and adaptive optimisation."""

__version__ = "0.1.0"
