"""trl-midalign: middle-layer representation alignment for cross-lingual transfer, as a drop-in TRL trainer."""

from .collator import DataCollatorForAlignment
from .config import AlignmentConfig
from .layers import get_decoder, get_decoder_layers, layer_hidden_states, resolve_layer
from .losses import contrastive_alignment_loss, masked_mean_pool
from .trainer import AlignmentTrainer


__version__ = "0.1.0"

__all__ = [
    "AlignmentConfig",
    "AlignmentTrainer",
    "DataCollatorForAlignment",
    "contrastive_alignment_loss",
    "get_decoder",
    "get_decoder_layers",
    "layer_hidden_states",
    "masked_mean_pool",
    "resolve_layer",
]
