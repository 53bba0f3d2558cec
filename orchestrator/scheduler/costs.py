"""Cold-start predictions: a model's latency and energy on an accelerator, from the model's work and
the accelerator's cost model, before any node has profiled the model.

Both halves come over the wire: the catalog reads a model's work when it is pushed
(``edgeward.v1.ModelWork``: MACs, other elements, layers, weight and I/O bytes), and every node
advertises its accelerators' cost models in its hello (``edgeward.v1.CostModel``: fixed cost per
inference, MAC and element rates, cost per layer, host link and on-device weight cache), with their
idle and active power. The formula is the backends' own (``accelerators.base.CostModel``),
vectorised here over node classes, accelerator kinds and models in one numpy expression per
snapshot. A node's own profile of a model, and its peers', take precedence wherever they exist.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray


class AcceleratorCost(NamedTuple):
    """An accelerator's cost model and power, as its node advertises them."""

    invoke_overhead_s: float
    macs_per_s: float
    elements_per_s: float
    layer_overhead_s: float
    link_bytes_per_s: float  # 0: computes in host memory (no transfers)
    weight_cache_bytes: float
    idle_w: float
    active_w: float

    def valid(self) -> bool:
        """Finite, positive rates, nothing negative, idle power at most the active power."""
        return (
            all(math.isfinite(v) and v >= 0 for v in self)
            and self.macs_per_s > 0
            and self.elements_per_s > 0
            and self.idle_w <= self.active_w
        )


class ModelWork(NamedTuple):
    """The work of one inference of a model, as the catalog read it from the model's shapes."""

    macs: float
    elements: float
    mac_layers: float
    element_layers: float
    weight_bytes: float
    io_bytes: float


def predict(
    costs: NDArray[np.float64], works: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(p95 latency in ms, joules) per inference of every model on every accelerator.

    ``costs`` is (..., 8) in :class:`AcceleratorCost` order, NaN where there is none; ``works``
    is (M, 6) in :class:`ModelWork` order. The results are (..., M), NaN where either is unknown.
    The model is deterministic, so its latency stands for the p95.
    """
    c = costs[..., np.newaxis, :]
    macs, elements, mac_layers, element_layers, weights, io = works.T
    compute = macs / c[..., 1] + elements / c[..., 2] + (mac_layers + element_layers) * c[..., 3]
    link = c[..., 4]
    over_link = link > 0
    streamed = np.maximum(weights - c[..., 5], 0.0)
    transfer = np.where(over_link, (io + streamed) / np.where(over_link, link, 1.0), 0.0)
    latency_s = c[..., 0] + transfer + compute
    energy_j = c[..., 6] * latency_s + (c[..., 7] - c[..., 6]) * compute
    return latency_s * 1e3, energy_j
