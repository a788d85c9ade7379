"""trl-midalign: middle-layer representation alignment for cross-lingual transfer, as a drop-in TRL trainer."""

from .config import AlignmentConfig
from .data import DataCollatorForAlignment
from .layers import get_decoder, get_decoder_layers, layer_hidden_states, packed_layer_hidden_states, resolve_layer
from .losses import contrastive_alignment_loss, masked_mean_pool, pool
from .merging import merge_adapters, search_merge_weights
from .modeling import load_causal_lm, load_tokenizer, prepare_gguf_model
from .probing import LayerProbeCallback, ProbeResult, probe_layers
from .task_loss import LabelsOnlySFTTrainer
from .trainer import AlignmentTrainer


__version__ = "0.1.0"

__all__ = [
    "AlignmentConfig",
    "AlignmentTrainer",
    "DataCollatorForAlignment",
    "LabelsOnlySFTTrainer",
    "LayerProbeCallback",
    "ProbeResult",
    "contrastive_alignment_loss",
    "get_decoder",
    "get_decoder_layers",
    "layer_hidden_states",
    "load_causal_lm",
    "load_tokenizer",
    "masked_mean_pool",
    "merge_adapters",
    "packed_layer_hidden_states",
    "pool",
    "prepare_gguf_model",
    "probe_layers",
    "resolve_layer",
    "search_merge_weights",
]
