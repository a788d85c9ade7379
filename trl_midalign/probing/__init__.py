"""Per-layer cross-lingual alignment probing: [`probe_layers`] and its result, plots, and a training callback."""

from .callback import LayerProbeCallback
from .probe import ProbeResult, probe_layers, recommend_layer


__all__ = ["LayerProbeCallback", "ProbeResult", "probe_layers", "recommend_layer"]
