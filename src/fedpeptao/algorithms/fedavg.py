"""FedAvg (McMahan et al., 2017): every shared tensor averaged by the clients' data sizes.

The average is the runtime's rule (``server.aggregation``): the weighted mean, or a robust
coordinate median / trimmed mean when the deployment asks for one.
"""

from __future__ import annotations

from typing import Literal

from fedpeptao.algorithms.base import Algorithm, AlgorithmSettings, register


class FedAvgSettings(AlgorithmSettings):
    name: Literal["fedavg"] = "fedavg"


@register
class FedAvg(Algorithm):
    name = "fedavg"
    settings_class = FedAvgSettings
