"""[`AlignmentConfig`]: [`~trl.SFTConfig`] plus the `align_*` settings. Their choices are the `Literal` types of the
modules that implement them (pooling, directions and stop-gradient in `losses.py`, schedules in `schedules.py`, layer
keywords in `layers.py`), so the command line lists and checks exactly what the code can do.
"""

import math
import numbers
from dataclasses import dataclass, field
from typing import get_args

from trl import SFTConfig

from ._logging import get_logger
from .layers import parse_layer_spec
from .losses import Direction, PoolingMode, StopGradient
from .schedules import Schedule


WEIGHT_WARNED = 100.0
"""`align_weight` above this is warned about (the usual values are 0.1-10)."""

logger = get_logger(__name__)

TEMPERATURE_RANGE = (0.01, 10.0)
"""The `align_temperature` values accepted: the usual ones are 0.05-1 (the paper: 0.1); 0.01 is CLIP's floor."""


def _parse_number(name: str, value, kind: type, example: str) -> int | float:
    """
    Return `value` as a `kind` (`int` or `float`), converting a numeric string as the command-line parser would; raise
    an error naming the setting for anything else (None, bools, non-numeric strings, other types).
    """
    word = "an int" if kind is int else "a number"
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            raise ValueError(f"{name}={value!r} is not {word}; pass {word}, for example {name}={example}.") from None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or (kind is int and not isinstance(value, numbers.Integral))
    ):
        raise TypeError(
            f"{name} must be {word}, got {value!r} ({type(value).__name__}); pass {word}, for example "
            f"{name}={example}."
        )
    return kind(value)


@dataclass
class AlignmentConfig(SFTConfig):
    r"""
    Configuration class for the [`AlignmentTrainer`]: [`~trl.SFTConfig`] plus the settings of the middle-layer
    alignment objective of Liu & Niehues (2025), https://huggingface.co/papers/2502.14830. Every new field starts with
    `align_` but `lm_head_on_labels_only` (how the task loss is computed); every field of [`~trl.SFTConfig`] keeps
    its meaning.

    Parameters:
        > Parameters that control where and how representations are aligned

        align_layer (`int`, `float` or `str`, *optional*, defaults to `"middle"`):
            Layer whose output is aligned, in transformers' `hidden_states` convention (layer 0 is the embedding
            output, layer `L` the output of block `L - 1`; the paper uses 16 of 32 for Llama 3). An int, a negative
            int counted from the top (`-1` is the last layer), a float in `(0, 1]` giving a fraction of the depth,
            `"middle"` (`N // 2` for a model of `N` blocks), or `"auto"` (probe the base model on a sample of the
            alignment pairs before training and take the layer with the best retrieval accuracy).
        align_temperature (`float`, *optional*, defaults to `0.1`):
            Temperature dividing the cosine similarities of the contrastive loss, in `[0.01, 10]` (the usual values
            are 0.05-1; below 0.01 the logits and gradients explode, above 10 the loss is nearly flat). As for every
            numeric `align_*` setting, a numeric string (`"0.1"`) is converted, as the command-line parser does; any
            other value (`None`, `nan`, `inf`, a non-numeric string) is refused with an error naming the setting.
        align_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the alignment loss: a finite number `>= 0` (`0` only with the `joint` schedule, where it measures
            `align_loss` without training it; warned about above 100).
        align_pooling (`str`, *optional*, defaults to `"mean"`):
            How a sentence's token states are pooled: `"mean"` over the attention mask (the reference, BOS
            included), `"mean_no_special"` (mean leaving out special tokens such as BOS/EOS), or `"last"` (the last
            token's state).
        align_directions (`str`, *optional*, defaults to `"source_to_target"`):
            `"source_to_target"`: each non-English sentence must retrieve its English translation among the batch
            (the reference); `"both"`: the average with the reverse direction.
        align_stop_gradient (`str` or `None`, *optional*, defaults to `None`):
            `"target"` detaches the English side, so only the other languages move (the paper's unidirectional
            variant); `None` trains both sides.
        align_max_length (`int`, *optional*, defaults to `256`):
            Maximum number of tokens of each parallel sentence, an int `>= 2`; longer sentences are truncated (with a
            warning). There is no unlimited setting (`None` is refused): pass a large int to keep whole sentences.

        > Parameters that control the training schedule and the data

        align_schedule (`str`, *optional*, defaults to `"alternate"`):
            `"alternate"`: micro-batches alternate between a task step and an alignment step, starting with a task
            step (the paper; double the epochs to see each example as often as with plain SFT); `"joint"`: one step
            on `task_loss + align_weight * align_loss`; `"alignment_only"`: alignment steps only, for training an
            alignment module on its own. With `alternate` and `gradient_accumulation_steps=1` every alignment
            micro-batch is an optimizer step of its own, and Adam's momentum then also repeats most of the preceding
            task update in the blocks below the aligned layer, whatever the alignment loss (0.67-0.96 of it on Gemma 3
            270M, `experiments/schedule_momentum/schedule_momentum.py`); with `gradient_accumulation_steps` of 2 or more (the paper: 4)
            every optimizer step holds task and alignment micro-batches.
        align_source_column (`str`, *optional*, defaults to `"parallel_source"`):
            Column holding the non-English sentence of each pair (`"text_parallel_0"` in the reference's files).
        align_target_column (`str`, *optional*, defaults to `"parallel_target"`):
            Column holding the English sentence of each pair (`"text_parallel_1"` in the reference's files).
        align_auto_num_pairs (`int`, *optional*, defaults to `256`):
            With `align_layer="auto"`, how many alignment pairs the layer probe uses.

        > Parameters that control how many negatives each pair sees (see docs/negatives.md)

        align_gather_negatives (`bool`, *optional*, defaults to `False`):
            Gather the pooled states of all processes before the contrastive loss, so that each pair competes with
            `world_size x batch` candidates instead of its own micro-batch (a differentiable all-gather; duplicates
            are masked across processes). Each process's loss is the mean over its own pairs; under DDP / DeepSpeed /
            FSDP, which average gradients over processes, a step equals the single-process step on the concatenated
            batch.
        align_mini_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Gradient caching: embed the pairs of an alignment step in mini-batches of this many pairs without
            activations, compute the loss and its gradient with respect to the pooled states on the whole batch,
            then re-run each mini-batch with its graph to back-propagate. The step costs a second forward of the pairs
            but needs the activation memory of one mini-batch only, so `per_device_train_batch_size` (or
            `align_batch_size`) pairs can exceed what fits. `None` disables it. Works single-process, under DDP and
            FSDP2 (not with the `joint` schedule with several processes); refused under DeepSpeed.
        align_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Pairs per device in an alignment micro-batch, when it should differ from the task batch
            (`per_device_train_batch_size` rows): each training row then carries `align_batch_size /
            per_device_train_batch_size` pairs (must divide), drawn in turn from `alignment_dataset` or from the
            pairs of the training rows. An epoch then uses that many times more pair slots (cycled when the pairs run
            out). Combine with `align_mini_batch_size` when the larger batch does not fit. `None`: one pair per row.

        > Parameters that control how the alignment and task losses are computed (not what they are)

        align_padding_free (`bool` or `None`, *optional*, defaults to `None`):
            Run the alignment forward without padding: the sentences of the pairs are packed into rows of at most
            `align_max_length` tokens, with positions restarting at 0 for each sentence and no attention mask, which
            eager, SDPA, flex and flash attention read as separate sequences (the same rule as TRL's `padding_free`
            for task rows). The pooled states and the loss equal the padded pairs' to float rounding. `None`: on where
            the model's attention implementation keeps packed sequences apart, padded otherwise; `True`: refused
            where it does not; `False`: padded pairs.

        lm_head_on_labels_only (`bool`, *optional*, defaults to `True`):
            Compute the task loss with the LM head applied only to the positions that predict a label (through
            transformers' `logits_to_keep`), instead of TRL's fused head, which on devices without Triton (the CPU)
            projects every position. The loss, its gradients and the logged `entropy`, `mean_token_accuracy` and
            `num_tokens` are TRL's. TRL's path is kept, with one info line saying why, where this cannot be exact:
            a `compute_loss_func`, label smoothing, a `loss_type` other than `"nll"`, Liger kernels, a router
            auxiliary loss, sequence parallelism, prompt-learning adapters, a model whose forward takes no
            `logits_to_keep`, and CUDA/XPU with Triton (where TRL's head already projects only the label positions).
    """

    align_layer: str = field(
        default="middle",
        metadata={
            "help": "Layer whose output is aligned (0 = embeddings, L = output of block L-1; 16 of 32 in the paper). "
            "An int, a negative int counted from the top (-1 = last), a float fraction of the depth in (0, 1], "
            "'middle' (N // 2) or 'auto' (probe the base model on the alignment pairs and take the best layer)."
        },
    )
    align_temperature: float = field(
        default=0.1,
        metadata={
            "help": "Temperature dividing the cosine similarities of the contrastive loss, in [0.01, 10] (usual: "
            "0.05-1; the paper: 0.1)."
        },
    )
    align_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the alignment loss, >= 0 (0 only with align_schedule='joint'; usual: 0.1-10)."},
    )
    align_pooling: PoolingMode = field(
        default="mean",
        metadata={
            "help": "Pooling of a sentence's token states: 'mean' over the attention mask (reference, BOS "
            "included), 'mean_no_special' (leaves out special tokens) or 'last' (last token).",
        },
    )
    align_directions: Direction = field(
        default="source_to_target",
        metadata={
            "help": "'source_to_target': each non-English sentence retrieves its English translation (reference); "
            "'both': averaged with the reverse direction.",
        },
    )
    align_stop_gradient: StopGradient = field(
        default=None,
        metadata={
            "help": "'target' detaches the English side (the paper's unidirectional variant); None trains both.",
        },
    )
    align_max_length: int = field(
        default=256,
        metadata={"help": "Maximum tokens per parallel sentence; longer ones are truncated with a warning."},
    )
    align_schedule: Schedule = field(
        default="alternate",
        metadata={
            "help": "'alternate': task and alignment micro-batches alternate, task first (the paper); 'joint': "
            "task_loss + align_weight * align_loss in one step; 'alignment_only': no task loss.",
        },
    )
    align_source_column: str = field(
        default="parallel_source",
        metadata={"help": "Column of the non-English sentence of each pair (reference files: text_parallel_0)."},
    )
    align_target_column: str = field(
        default="parallel_target",
        metadata={"help": "Column of the English sentence of each pair (reference files: text_parallel_1)."},
    )
    align_auto_num_pairs: int = field(
        default=256,
        metadata={"help": "With align_layer='auto', the number of alignment pairs the layer probe uses."},
    )
    align_gather_negatives: bool = field(
        default=False,
        metadata={
            "help": "Gather the pooled pair states of all processes (differentiable all-gather), so that each pair "
            "competes with world_size x batch candidates; duplicates are masked across processes."
        },
    )
    align_mini_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Gradient caching: embed the alignment pairs in mini-batches of this many pairs (no activations "
            "kept), then re-run each with its graph to back-propagate the cached gradients. Large alignment batches "
            "at the memory of one mini-batch, for a second forward. None disables it."
        },
    )
    align_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Pairs per device in an alignment micro-batch when it differs from per_device_train_batch_size: "
            "each row carries align_batch_size / per_device_train_batch_size pairs (must divide). None: one pair "
            "per row."
        },
    )

    align_padding_free: bool | None = field(
        default=None,
        metadata={
            "help": "Pack the pair sentences into rows without padding for the alignment forward (positions restart "
            "per sentence). None: where the attention implementation keeps packed sequences apart (eager, sdpa, "
            "flex_attention, flash); True: refused where it does not; False: padded pairs."
        },
    )

    lm_head_on_labels_only: bool = field(
        default=True,
        metadata={
            "help": "Compute the task loss with the LM head only on the positions that predict a label (exactly "
            "TRL's loss and metrics); TRL's fused head is kept where that cannot be exact (compute_loss_func, label "
            "smoothing, loss_type other than nll, Liger, a model without logits_to_keep, CUDA/XPU with Triton)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.align_layer = parse_layer_spec(self.align_layer)
        self.align_temperature = _parse_number("align_temperature", self.align_temperature, float, "0.1")
        if not math.isfinite(self.align_temperature) or self.align_temperature <= 0:
            raise ValueError(
                f"align_temperature must be a finite number > 0, got {self.align_temperature}; the paper uses 0.1."
            )
        low, high = TEMPERATURE_RANGE
        if not low <= self.align_temperature <= high:
            effect = (
                "cosine similarities (in [-1, 1]) divided by it make logits so large that the loss and its gradients "
                "explode (or overflow)"
                if self.align_temperature < low
                else "cosine similarities divided by it differ so little that the loss is nearly flat and aligns nothing"
            )
            raise ValueError(
                f"align_temperature={self.align_temperature} is outside the sane range [{low}, {high}]: {effect}. The "
                "paper uses 0.1; contrastive sentence losses use 0.05-1 (0.05 in SimCSE and sentence-transformers)."
            )
        self.align_weight = _parse_number("align_weight", self.align_weight, float, "1.0")
        if not math.isfinite(self.align_weight) or self.align_weight < 0:
            raise ValueError(
                f"align_weight must be a finite number >= 0, got {self.align_weight}; the paper uses 1.0."
            )
        if isinstance(self.align_stop_gradient, str) and self.align_stop_gradient.lower() in ("none", "null", ""):
            self.align_stop_gradient = None
        for name, choices in (
            ("align_pooling", PoolingMode),
            ("align_directions", Direction),
            ("align_stop_gradient", StopGradient),
            ("align_schedule", Schedule),
        ):
            value, allowed = getattr(self, name), get_args(choices)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}.")
        if self.align_weight == 0 and self.align_schedule != "joint":
            raise ValueError(
                f"align_weight=0 with align_schedule={self.align_schedule!r}: every alignment micro-batch would train "
                "nothing (its loss is 0 x align_loss) and still cost a forward and an optimizer update. To train the "
                "task alone while measuring align_loss, use align_schedule='joint' with align_weight=0; otherwise "
                "give align_weight a value > 0 (the paper: 1.0)."
            )
        if self.align_weight > WEIGHT_WARNED:
            logger.warning(
                f"align_weight={self.align_weight} is far above the usual 0.1-10 (the paper: 1.0): the alignment loss "
                "would swamp the task loss (in the 'joint' schedule) or take huge steps (in the others)."
            )
        if self.align_max_length is None:
            raise TypeError(
                "align_max_length=None: it must be an int number of tokens >= 2 (default 256). There is no unlimited "
                "setting (unlike max_length): pass a large int, such as 1024, to keep whole sentences."
            )
        self.align_max_length = _parse_number("align_max_length", self.align_max_length, int, "256")
        if self.align_max_length < 2:
            raise ValueError(f"align_max_length must be >= 2 tokens, got {self.align_max_length}.")
        self.align_auto_num_pairs = _parse_number("align_auto_num_pairs", self.align_auto_num_pairs, int, "256")
        if self.align_auto_num_pairs < 2:
            raise ValueError(f"align_auto_num_pairs must be >= 2, got {self.align_auto_num_pairs}.")
        for name in ("align_source_column", "align_target_column"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be the non-empty name of a dataset column, got {value!r}.")
        if self.align_source_column == self.align_target_column:
            raise ValueError(
                f"align_source_column and align_target_column are both {self.align_source_column!r}; they must name "
                "the two different sides of each pair."
            )
        if self.per_device_train_batch_size < 2:
            raise ValueError(
                f"per_device_train_batch_size={self.per_device_train_batch_size}: the contrastive alignment loss uses "
                "the other pairs of a batch as negatives, so each device needs at least 2 rows per batch. Raise it "
                "to 2 or more (use gradient_accumulation_steps for memory)."
            )
        if self.align_mini_batch_size is not None and self.align_mini_batch_size < 1:
            raise ValueError(
                f"align_mini_batch_size must be >= 1 pair (or None to disable gradient caching), got "
                f"{self.align_mini_batch_size}."
            )
        if self.align_batch_size is not None:
            if self.align_batch_size < 2:
                raise ValueError(
                    f"align_batch_size={self.align_batch_size}: the contrastive loss needs at least 2 pairs per batch."
                )
            if self.align_batch_size % self.per_device_train_batch_size:
                lower = self.align_batch_size // self.per_device_train_batch_size * self.per_device_train_batch_size
                raise ValueError(
                    f"align_batch_size={self.align_batch_size} is not a multiple of per_device_train_batch_size="
                    f"{self.per_device_train_batch_size}: each training row carries align_batch_size / "
                    f"per_device_train_batch_size pairs. Use {max(lower, self.per_device_train_batch_size)} or "
                    f"{lower + self.per_device_train_batch_size}."
                )
