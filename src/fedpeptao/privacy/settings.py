"""``privacy.*``: client-level differential privacy (DP-FedAvg style) and how it is accounted.

The unit of privacy is a client: everything one client sends in a run (its updates, and its
layer scores and Hessian ratio when those are released privately) is clipped and noised, so the
released model changes little whether or not any one client took part.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PrivacyMode = Literal["none", "central", "local", "distributed"]


class SecAggConfig(BaseModel):
    """``privacy.secagg.*``: Flower's SecAgg+ parameters (``SecAggPlusWorkflow``'s arguments), used
    when ``privacy.secure_aggregation`` is on; the simulator runs the same arithmetic.

    ``num_shares``: neighbours each client shares its keys with (itself included); a float is a
    fraction of the round's clients (``1.0``: all). ``reconstruction_threshold``: shares needed to
    rebuild a key, so the fewest clients that must answer every stage; a float is a fraction of
    ``num_shares`` (rounded, at least 2). ``clipping_range`` ``c``, ``quantization_range`` ``T``,
    ``modulus_range`` ``M``: every contributed value is clipped to ``[-c, c]`` and rounded
    stochastically to one of ``T`` levels (a quantum ``2c / T``); the sum is exact while ``n T < M``.
    ``max_examples``: the public scale of the weights without DP (a client's weight in the masked
    sum is ``num_examples / max_examples``).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 2 / 3
    clipping_range: float = Field(8.0, gt=0.0)
    quantization_range: int = 2 ** 30
    modulus_range: int = 2 ** 40
    max_examples: int = Field(1000, ge=1)

    @field_validator("num_shares")
    @classmethod
    def _shares(cls, value):
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError(f"privacy.secagg.num_shares: a fraction in (0, 1] or a count >= 2, got {value}")
        if isinstance(value, int) and value < 2:
            raise ValueError(f"privacy.secagg.num_shares: a fraction in (0, 1] or a count >= 2, got {value}")
        return value

    @field_validator("reconstruction_threshold")
    @classmethod
    def _threshold(cls, value):
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError(f"privacy.secagg.reconstruction_threshold: a fraction in (0, 1] or a count >= 2, "
                             f"got {value}")
        if isinstance(value, int) and value < 2:
            raise ValueError(f"privacy.secagg.reconstruction_threshold: a fraction in (0, 1] or a count >= 2, "
                             f"got {value}")
        return value

    @field_validator("quantization_range")
    @classmethod
    def _levels(cls, value):
        if not 1 < value < 2 ** 31:  # Flower rounds into int32
            raise ValueError(f"privacy.secagg.quantization_range: must lie in (1, 2**31), got {value}")
        return value

    @field_validator("modulus_range")
    @classmethod
    def _modulus(cls, value):
        if value < 2 or value & (value - 1) or value > 2 ** 62:  # Flower's int64 arithmetic wraps mod 2**64
            raise ValueError(f"privacy.secagg.modulus_range: must be a power of 2 up to 2**62, got {value}")
        return value

    @property
    def quantum(self) -> float:
        """One quantization step, ``2 c / T``: the largest error of one contributed value."""
        return 2.0 * self.clipping_range / self.quantization_range

    def error_bound(self, contributors: int) -> float:
        """The largest error of one entry of a sum over ``contributors`` (each within ``[-c, c]``)."""
        return contributors * self.quantum

    def shares(self, num_sampled: int) -> int:
        """Flower's number of key shares for a round of ``num_sampled`` clients."""
        if isinstance(self.num_shares, int):
            return self.num_shares
        shares = round(self.num_shares * num_sampled)
        if shares < num_sampled and shares % 2 == 0:
            shares += 1
        return num_sampled if shares <= 2 else shares

    def threshold(self, num_sampled: int) -> int:
        """Flower's reconstruction threshold for a round of ``num_sampled`` clients: the fewest
        that must answer every stage for the round's sum to be revealed."""
        if isinstance(self.reconstruction_threshold, int):
            return self.reconstruction_threshold
        return max(round(self.reconstruction_threshold * self.shares(num_sampled)), 2)

    def refusal(self, per_round: int) -> str | None:
        """Why these settings cannot sum ``per_round`` clients (one line naming the key; None: they can)."""
        if per_round < 2:
            return (f"federated.clients_per_round: secure aggregation needs at least 2 clients per round, "
                    f"got {per_round}")
        if per_round * self.quantization_range >= self.modulus_range:
            return (f"privacy.secagg.modulus_range: {per_round} clients x quantization_range {self.quantization_range} "
                    f"reach modulus_range {self.modulus_range}, so the sum would wrap around; raise modulus_range or "
                    f"lower quantization_range")
        shares = self.shares(per_round)
        if shares > per_round:
            return f"privacy.secagg.num_shares: {shares} exceeds the {per_round} clients per round"
        if self.threshold(per_round) > shares:
            return (f"privacy.secagg.reconstruction_threshold: {self.threshold(per_round)} exceeds the {shares} "
                    f"shares of a round")
        return None

    def flower(self) -> dict[str, int | float]:
        """The arguments of Flower's workflow (``fedpeptao.flower.secagg.SecAggSettings``)."""
        return {"num_shares": self.num_shares, "reconstruction_threshold": self.reconstruction_threshold,
                "clipping_range": self.clipping_range, "quantization_range": self.quantization_range,
                "modulus_range": self.modulus_range}


class PrivacySettings(BaseModel):
    """``mode``: ``none``; ``central`` (a trusted server clips each update to ``clip_norm`` and adds
    Gaussian noise of std ``noise_multiplier * clip_norm`` to the sum, then divides by the expected
    number of clients); ``local`` (each device clips and noises its own update before it leaves);
    ``distributed`` (needs ``secure_aggregation``: each device clips its update and adds its share
    ``N(0, (z C)^2 / clients_per_round)`` of the noise, so the securely summed updates carry what
    central DP would add, and no one, the server included, sees an update or the noiseless sum).
    Give ``noise_multiplier`` or ``target_epsilon`` (the multiplier is then solved for the whole
    run before training starts); ``delta`` defaults to ``0.1 / num_clients``.

    ``secure_aggregation``: the server learns only the sum of each round's updates, through
    Flower's SecAgg+ (``secagg.*``); with ``mode=central`` the devices clip and the server adds
    the noise to the sum it learns.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    mode: PrivacyMode = "none"
    secure_aggregation: bool = False
    secagg: SecAggConfig = SecAggConfig()
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
        if self.mode == "distributed" and not self.secure_aggregation:
            raise ValueError("privacy.secure_aggregation: privacy.mode=distributed needs secure aggregation (each "
                             "device adds only a share of the noise, too little on its own update)")
        if self.mode == "none":
            return self
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("privacy.target_epsilon: give privacy.noise_multiplier or privacy.target_epsilon, "
                             "not both")
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(f"privacy.noise_multiplier: privacy.mode={self.mode} needs privacy.noise_multiplier or "
                             f"privacy.target_epsilon")
        if self.clip_norm == "adaptive" and (self.mode != "central" or self.secure_aggregation):
            raise ValueError("privacy.clip_norm: adaptive clipping needs a server that counts clipped updates "
                             "(privacy.mode=central without privacy.secure_aggregation)")
        if self.selection == "public" and not self.public_data:
            raise ValueError("privacy.public_data: privacy.selection=public needs a public task folder or file")
        return self

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def sampled_rounds(self) -> bool:
        """Whether a round's noise is on the sum of the sampled clients' updates (``central``,
        ``distributed``), so the accountant amplifies by the sampling; ``local`` rounds are not."""
        return self.mode in ("central", "distributed")

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
