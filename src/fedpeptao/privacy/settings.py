"""``privacy.*``: client-level differential privacy (DP-FedAvg style) and how it is accounted.

The unit of privacy is a client: everything one client sends in a run (its updates, and its
layer scores and Hessian ratio when those are released privately) is clipped and noised, so the
released model changes little whether or not any one client took part.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PrivacyMode = Literal["none", "central", "local"]


class PrivacySettings(BaseModel):
    """``mode``: ``none``; ``central`` (a trusted server clips each update to ``clip_norm`` and adds
    Gaussian noise of std ``noise_multiplier * clip_norm`` to the sum, then divides by the expected
    number of clients); ``local`` (each device clips and noises its own update before it leaves).
    Give ``noise_multiplier`` or ``target_epsilon`` (the multiplier is then solved for the whole
    run before training starts); ``delta`` defaults to ``0.1 / num_clients``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    mode: PrivacyMode = "none"
    clip_norm: float | Literal["adaptive"] = 1.0  # L2 bound of one client's update, or adaptive clipping
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    # adaptive clipping (Andrew et al., 2021): the clip follows a quantile of the update norms
    target_quantile: float = Field(0.5, gt=0.0, lt=1.0)
    initial_clip_norm: float = Field(0.1, gt=0.0)
    clip_lr: float = Field(0.2, gt=0.0)  # geometric step of the clip norm per round
    clipped_count_stddev: float | None = Field(None, gt=0.0)  # noise on the clipped count; None: per_round / 20
    # FedPepTAO's data-dependent selection (layer scores, Hessian ratio)
    selection: Literal["private", "public"] = "private"
    public_data: str | None = None  # a task folder or file whose training split selection reads
    public_examples: int = Field(256, ge=2)

    @field_validator("clip_norm", mode="before")
    @classmethod
    def _clip(cls, value):
        if isinstance(value, str) and value != "adaptive":
            try:
                value = float(value)
            except ValueError:
                raise ValueError("privacy.clip_norm: a positive number or 'adaptive'") from None
        if not isinstance(value, str) and not value > 0:
            raise ValueError(f"privacy.clip_norm: must be > 0 (or 'adaptive'), got {value}")
        return value

    @field_validator("noise_multiplier")
    @classmethod
    def _noise(cls, value):
        if value is not None and value < 0:
            raise ValueError(f"privacy.noise_multiplier: must be >= 0, got {value}")
        return value

    @field_validator("target_epsilon")
    @classmethod
    def _epsilon(cls, value):
        if value is not None and not value > 0:
            raise ValueError(f"privacy.target_epsilon: must be > 0, got {value}")
        return value

    @field_validator("delta")
    @classmethod
    def _delta(cls, value):
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError(f"privacy.delta: must lie in (0, 1), got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PrivacySettings:
        if self.mode == "none":
            return self
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("privacy.target_epsilon: give privacy.noise_multiplier or privacy.target_epsilon, "
                             "not both")
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(f"privacy.noise_multiplier: privacy.mode={self.mode} needs privacy.noise_multiplier or "
                             f"privacy.target_epsilon")
        if self.clip_norm == "adaptive" and self.mode == "local":
            raise ValueError("privacy.clip_norm: adaptive clipping needs a server that counts clipped updates "
                             "(privacy.mode=central)")
        if self.selection == "public" and not self.public_data:
            raise ValueError("privacy.public_data: privacy.selection=public needs a public task folder or file")
        return self

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def adaptive(self) -> bool:
        return self.clip_norm == "adaptive"

    @property
    def public_selection(self) -> bool:
        """Selection reads ``public_data`` instead of the clients' data (and costs no budget)."""
        return self.enabled and self.selection == "public"

    def resolved_count_stddev(self, per_round: int) -> float:
        """``clipped_count_stddev``, by default ``per_round / 20`` (Andrew et al.'s choice)."""
        return self.clipped_count_stddev or per_round / 20

    def resolved_delta(self, num_clients: int) -> float:
        """``delta``, by default ``0.1 / num_clients`` (below ``1 / num_clients``, as DP asks)."""
        return self.delta if self.delta is not None else 0.1 / num_clients
