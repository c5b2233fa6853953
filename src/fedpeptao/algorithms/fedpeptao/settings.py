"""FedPepTAO's settings (``method.*``): which layers travel and when (SPEC 2), the server step (SPEC 3)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fedpeptao.algorithms.base import AlgorithmSettings


class FedPepTAOSettings(AlgorithmSettings):
    name: Literal["fedpeptao"] = "fedpeptao"
    # which layers travel (SPEC 2)
    ratio: float | Literal["auto"] = "auto"  # share top ceil(ratio*L) layers; auto = Hessian eigen-density
    layers: list[int] | None = None  # explicit shared layers (overrides ratio)
    score_batch_size: int = Field(8, ge=2)
    warmup_rounds: int = Field(10, ge=0)  # FedAvg rounds before the switch, inside federated.rounds
    hessian_clients: int = Field(3, ge=1)  # at most this many of the last warm-up round's clients
    hessian_batch_size: int | None = Field(None, ge=1)  # None: one training batch (client.batch_size)
    hessian_probes: int = Field(1, ge=1)  # Lanczos probes per client (the reference's n_v)
    lanczos_iters: int = Field(50, ge=2)
    share_head: bool = True
    # the server step (SPEC 3)
    server_lr: float = Field(0.05, gt=0.0)
    lr_decay: float = Field(0.99, gt=0.0, le=1.0)
    lr_min: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    variant: Literal["plain", "reference"] = "plain"
    use_control_variates: bool = True
    #: which ``c - c_k`` the server step applies: ``published`` (SPEC 3, the reference code) or
    #: ``previous`` (the one held before the round, as SCAFFOLD's clients use it): stable with few
    #: local steps per round, where the published one turns the step against the clients
    correction: Literal["published", "previous"] = "published"
    use_momentum: bool = True
    robust_averaging = False
    needs_layer_groups = True

    @model_validator(mode="after")
    def _ratio_range(self) -> FedPepTAOSettings:
        if isinstance(self.ratio, float) and not 0.0 < self.ratio <= 1.0:
            raise ValueError("method.ratio: must be in (0, 1] or 'auto'")
        return self

    def estimates_ratio(self) -> bool:
        """Whether the share ratio comes from the Hessian after a warm-up (``ratio = "auto"``)."""
        return self.ratio == "auto" and self.layers is None

    def private_releases(self) -> int:
        """The layer scores, and the Hessian ratio when it is estimated."""
        return 1 + int(self.estimates_ratio())

    def switch_round(self) -> int:
        """The round the selective step starts: after the warm-up when the ratio is estimated."""
        return self.warmup_rounds if self.estimates_ratio() else 0
