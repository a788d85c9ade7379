"""[`AlignmentTrainer`]: [`~trl.SFTTrainer`] plus the middle-layer alignment loss.

The model is set up and the aligned layer resolved before `SFTTrainer` takes over; the data's checks and attachment
live in `data.py`. `compute_loss` runs the task loss and/or the alignment loss as the schedule says, the alignment
forward inside one forward of the outermost wrapper. Checkpoints record the schedule's phase in
`alignment_state.json`, checked on resume (their integrity lives in `checkpoints.py`, the model card in
`model_card.py`).
"""

import contextlib
import dataclasses
import math
import os
import re
import textwrap
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from datasets import Dataset, IterableDataset
from torch import nn
from transformers import PreTrainedModel, ProcessorMixin, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer
from trl.models.utils import _ForwardRedirection

from ._logging import get_logger
from .checkpoints import (
    acquire_output_dir_lock,
    check_output_dir,
    check_weights_are_finite,
    no_space_error,
    release_output_dir_lock,
    resolve_resume_checkpoint,
    restore_alignment_state,
    resume_advice,
    warn_about_earlier_checkpoints,
    write_alignment_state,
)
from .config import AlignmentConfig
from .data import (
    PAIR_KEYS,
    DataCollatorForAlignment,
    all_rows_dropped_message,
    attach_alignment_dataset,
    check_batch_for_schedule,
    check_dataset_kind,
    check_eval_dataset,
    check_prepared_dataset,
    has_pair_columns,
    named_datasets,
    pack_with_pairs,
)
from .layers import (
    get_decoder_layers,
    layer_hidden_states,
    num_decoder_layers,
    packed_layer_hidden_states,
    resolve_layer,
)
from .losses import contrastive_alignment_loss, gradient_cached_loss, pool
from .model_card import alignment_section, update_card
from .modeling import check_decoder_only_lm, load_model_for_training, prepare_gguf_model
from .probing import LayerProbeCallback, ProbeResult, probe_layers
from .probing.probe import no_recommendation_reason
from .schedules import is_alignment_step, is_task_step
from .task_loss import compute_task_loss, labels_only_head_unsupported


logger = get_logger(__name__)

# Attention implementations that keep padding-free (packed) sequences apart, given per-sequence `position_ids` and no
# cache: transformers builds a per-sequence mask for these, and flash-attention kernels read the sequence boundaries.
_PADDING_FREE_ATTENTION = ("eager", "sdpa", "flex_attention")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _as_alignment_config(args: TrainingArguments | None, model: "str | PreTrainedModel") -> AlignmentConfig:
    """`args` as an [`AlignmentConfig`]: any other arguments get the default `align_*` settings."""
    if args is None:
        model_name = model if isinstance(model, str) else model.config._name_or_path
        return AlignmentConfig(f"{(model_name or 'model').split('/')[-1]}-MidAlign")
    if isinstance(args, AlignmentConfig):
        return args
    # Copy the fields themselves: `to_dict` masks every `*_token` field (hub_token, eos_token, pad_token)
    return AlignmentConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init})


def _fsdp_version(args: TrainingArguments) -> int | None:
    """The FSDP version this run uses (from the arguments or an accelerate launch), or `None` without FSDP."""
    if args.fsdp:
        return int((args.fsdp_config or {}).get("version", 2))
    if _env_flag("ACCELERATE_USE_FSDP"):
        return int(os.environ.get("FSDP_VERSION", "1"))  # accelerate's own default
    return None


def _uses_deepspeed(args: TrainingArguments) -> bool:
    return bool(args.deepspeed) or _env_flag("ACCELERATE_USE_DEEPSPEED")


def _check_alignment_setup(args: AlignmentConfig) -> None:
    """
    The `align_*` checks that depend on the engine and the number of processes (those of the settings alone are in
    [`AlignmentConfig`]): refuse the engines the alignment forward was not built and tested for, and the combinations
    of gradient caching it cannot run, naming the fix. An alignment step leaves the blocks above the aligned layer
    (and the LM head) without gradients, so DDP is told to look for unused parameters in every schedule that has
    alignment-only steps.
    """
    if _fsdp_version(args) == 1:
        raise ValueError(
            "FSDP version 1 is not supported by AlignmentTrainer: its flat-parameter wrapper does not let the "
            "alignment forward run the blocks below the aligned layer alone. Use FSDP2 (`fsdp_version: 2` in the "
            "accelerate config, as recipes/accelerate_configs/fsdp2.yaml, or fsdp_config={'version': 2}), DeepSpeed "
            "ZeRO or DDP."
        )
    if _env_flag("ACCELERATE_USE_MEGATRON_LM"):
        raise ValueError(
            "Megatron-LM is not supported by AlignmentTrainer (its model is not a transformers causal LM whose decoder "
            "blocks can be run alone). Use FSDP2, DeepSpeed ZeRO or DDP."
        )
    if args.align_mini_batch_size is not None:
        if _uses_deepspeed(args):
            raise ValueError(
                f"align_mini_batch_size={args.align_mini_batch_size} (gradient caching) is not supported under "
                "DeepSpeed: its second forward runs inside the backward, and DeepSpeed reduces each gradient only "
                "once per backward. Use DDP, FSDP2 or one process, or leave align_mini_batch_size unset "
                "(align_gather_negatives works under DeepSpeed)."
            )
        if args.align_schedule == "joint" and args.world_size > 1:
            raise ValueError(
                "align_mini_batch_size (gradient caching) with align_schedule='joint' is not supported with "
                "several processes: the cached alignment backward would run DDP forwards inside the task's DDP "
                "backward. Use align_schedule='alternate' (or 'alignment_only'), or one process."
            )
    if args.align_schedule == "joint":
        return
    if args.ddp_find_unused_parameters is False:
        raise ValueError(
            f"align_schedule={args.align_schedule!r} runs alignment steps that leave the blocks above the aligned "
            "layer unused, which DDP only accepts with ddp_find_unused_parameters=True. Leave it unset or set it to "
            "True (or use align_schedule='joint')."
        )
    args.ddp_find_unused_parameters = True


def _adapter_config_below_layer(peft_config: Any, model: nn.Module, args: AlignmentConfig, layer: int) -> Any:
    """
    The `peft_config` of an alignment-only module: it changes only the blocks below the aligned layer (the blocks
    above never run), so the adapter created from it is put on those blocks only (`layers_to_transform`), and the
    saved adapter holds them alone and merges with a task adapter as what it is. PEFT takes no `layers_to_transform`
    with `target_modules` given as a string (`"all-linear"` or a regular expression): those are resolved here to the
    names of the modules they select in those blocks. An explicit `layers_to_transform`, a PEFT model passed in (for
    example an adapter trained before) and the other schedules are left as they are. A copy: the caller's config
    stays as the caller wrote it.
    """
    if (
        args.align_schedule != "alignment_only"
        or peft_config is None
        or hasattr(model, "peft_config")
        or not hasattr(peft_config, "layers_to_transform")
        or peft_config.layers_to_transform is not None
    ):
        return peft_config
    if isinstance(peft_config.target_modules, str):
        names = _modules_below_layer(model, peft_config.target_modules, layer)
        return dataclasses.replace(peft_config, target_modules=names)
    return dataclasses.replace(peft_config, layers_to_transform=list(range(layer)))


def _modules_below_layer(model: nn.Module, target_modules: str, layer: int) -> list[str]:
    """The full names of the modules of blocks `0 .. layer - 1` that PEFT's string `target_modules` selects: every
    linear layer for `"all-linear"`, else those whose full name matches the regular expression."""
    from transformers.pytorch_utils import Conv1D

    names = {id(module): name for name, module in model.named_modules()}
    selected = []
    for block in list(get_decoder_layers(model))[:layer]:
        for name, module in block.named_modules(prefix=names[id(block)]):
            if target_modules == "all-linear":
                if isinstance(module, nn.Linear | Conv1D):
                    selected.append(name)
            elif re.fullmatch(target_modules, name):
                selected.append(name)
    if not selected:
        raise ValueError(
            f"peft_config.target_modules={target_modules!r} selects no module in the decoder blocks below the aligned "
            f"layer {layer}, the only blocks an alignment-only module trains. Name modules of those blocks (for "
            "example 'all-linear' or ['q_proj', 'v_proj'])."
        )
    return selected


def _place_for_probe(model: nn.Module, args: AlignmentConfig) -> None:
    """
    Move a model that sits on the CPU to the training device, as `Trainer` does right after, so that the layer probe
    of `align_layer="auto"` runs there. Models that `Trainer` does not move (placed by DeepSpeed, FSDP, a device map,
    bitsandbytes, or under `*_full_eval`) stay where they are.
    """
    if (
        args.device.type == "cpu"
        or args.place_model_on_device is False
        or _uses_deepspeed(args)
        or _fsdp_version(args) is not None
        or args.fp16_full_eval
        or args.bf16_full_eval
        or getattr(model, "hf_device_map", None)
        or getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
        or any(p.device.type != "cpu" for p in model.parameters())
    ):
        return
    model.to(args.device)


def _no_batch_dispatch(args: AlignmentConfig, *datasets: Any) -> None:
    """
    Let every process read its own batches of a streamed set. accelerate's default for an `IterableDataset` is to
    read batches on the main process and cut every tensor of the batch to the size of its first one (`input_ids`),
    which would cut the pair tensors (`2 * batch` rows of sources then targets) in half. `dispatch_batches=False`
    is accelerate's other mode and changes nothing for map-style sets; an explicit `True` is refused.
    """
    streamed = any(
        isinstance(d, IterableDataset)
        for value in datasets
        for d in (value.values() if isinstance(value, dict) else [value])
    )
    if args.accelerator_config.dispatch_batches and streamed:
        raise ValueError(
            "accelerator_config.dispatch_batches=True with a streamed (IterableDataset) set: accelerate would cut the "
            "alignment pair tensors of each batch (sources then targets, twice the rows of input_ids) to the batch "
            "size, dropping the targets. Leave dispatch_batches unset or set it to False."
        )
    args.accelerator_config.dispatch_batches = False


def _separates_packed_sequences(model: nn.Module) -> bool:
    attention = getattr(model.config, "_attn_implementation", None) or "eager"
    return attention in _PADDING_FREE_ATTENTION or "flash" in attention


def _align_padding_free(model: nn.Module, setting: bool | None) -> bool:
    """Whether the alignment forward packs the pairs (`AlignmentConfig.align_padding_free`), refusing `True` where the
    attention implementation would let packed sentences attend to each other."""
    if setting is False:
        return False
    separates = _separates_packed_sequences(model)
    if setting and not separates:
        attention = getattr(model.config, "_attn_implementation", None)
        raise ValueError(
            f"align_padding_free=True packs the alignment sentences into shared rows, and attn_implementation="
            f"{attention!r} is not known to keep them apart: they would attend to each other. Load the model with "
            "attn_implementation='sdpa' or 'flash_attention_2', or leave align_padding_free unset (padded pairs)."
        )
    return separates


def _check_padding_free_attention(model: nn.Module) -> None:
    if not _separates_packed_sequences(model):
        attention = getattr(model.config, "_attn_implementation", None) or "eager"
        raise ValueError(
            f"padding_free=True (or packing with a 'bfd' strategy) puts several sequences in one row, and "
            f"attn_implementation={attention!r} is not known to keep them apart: they would attend to each other. "
            "Load the model with attn_implementation='sdpa' or 'flash_attention_2' (model_init_kwargs or "
            "from_pretrained), or set padding_free=False and packing=False."
        )


class AlignmentTrainer(SFTTrainer):
    """
    [`~trl.SFTTrainer`] with the middle-layer representation alignment of Liu & Niehues (2025): alongside the task
    loss, parallel sentences are pulled together at a middle layer by a contrastive loss, which improves transfer of
    the task to languages without task data.

    Swapping `SFTTrainer` for `AlignmentTrainer` in an SFT script is the only change needed, once every training row
    carries a parallel pair (columns `parallel_source`, the non-English sentence, and `parallel_target`, its English
    translation) or the pairs come as a separate `alignment_dataset`. Every dataset format of `SFTTrainer` works (text,
    prompt-completion, conversational), with padded, padding-free (`padding_free=True`) or packed (`packing=True`)
    task batches; under packing each packed row carries the pairs of the rows packed into it.

    The pair's states at `align_layer` come from a forward that runs only the blocks below the layer and never the
    LM head; both sides run in one batched forward. That forward runs inside one forward of the outermost module that
    owns the parameters (DDP wrapper, DeepSpeed engine, FSDP2 root or the model itself), so every backward matches
    exactly one forward of it. FSDP1 is refused.

    Evaluation sets without pairs are evaluated on the task loss alone; the alignment loss is evaluated on the sets
    that carry pairs (for a dict of sets, the metrics are named after each key: `eval_<key>_align_loss`). Alignment
    batches in which every other pair repeats a sentence (so no negative is left) are counted in the logged
    `align_steps_without_negatives` and warned about. A non-finite loss while training raises a `FloatingPointError`
    naming the step before the weights change, and no checkpoint is written with non-finite weights. Checkpoints
    record the aligned layer, the schedule and its phase in `alignment_state.json`, written last and atomically;
    resuming checks them and names the newest intact checkpoint when the one given is broken.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from trl_midalign import AlignmentConfig, AlignmentTrainer

    >>> dataset = Dataset.from_list(
    ...     [
    ...         {
    ...             "prompt": "Wake me up at seven",
    ...             "completion": "time: seven",
    ...             "parallel_source": "Weck mich um sieben",
    ...             "parallel_target": "Wake me up at seven",
    ...         },
    ...         ...,
    ...     ]
    ... )
    >>> trainer = AlignmentTrainer(
    ...     model="Qwen/Qwen2.5-0.5B-Instruct", args=AlignmentConfig(output_dir="out"), train_dataset=dataset
    ... )
    >>> trainer.train()
    ```

    Args:
        model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_loss_func, compute_metrics,
        callbacks, optimizers, optimizer_cls_and_kwargs, preprocess_logits_for_metrics, quantization_config,
        peft_config, formatting_func:
            As in [`~trl.SFTTrainer`]. `args` may be an [`AlignmentConfig`], an [`~trl.SFTConfig`] or a
            [`~transformers.TrainingArguments`] (converted to an [`AlignmentConfig`] with default `align_*`
            settings). A `data_collator` is wrapped so that it still builds the task part of each batch. A model
            given by name is loaded here as `SFTTrainer` would load it (from `args.model_init_kwargs`, GGUF files
            included), so that the aligned layer is known before the adapter is created: with
            `align_schedule="alignment_only"`, an adapter created from `peft_config` is put on the blocks below that
            layer only (`layers_to_transform`, unless it is set).
        alignment_dataset ([`~datasets.Dataset`], *optional*):
            Parallel pairs kept apart from the task rows, with the columns named by `align_source_column` and
            `align_target_column`. They are shuffled with `args.seed` and attached to the training rows in turn
            (cycled when there are fewer pairs than rows). With `align_schedule="alignment_only"`, `train_dataset` may
            be `None` and the pairs are the training data.
    """

    _tag_names = ["trl", "sft", "trl-midalign", "cross-lingual-alignment"]
    _name = "Middle-Layer Alignment"
    _paper = {
        "title": "Middle-Layer Representation Alignment for Cross-Lingual Transfer in Fine-Tuned LLMs",
        "id": "2502.14830",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{liu2025middle,
                title        = {{Middle-Layer Representation Alignment for Cross-Lingual Transfer in Fine-Tuned LLMs}},
                author       = {Danni Liu and Jan Niehues},
                year         = 2025,
                booktitle    = {Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics},
            }"""),
    }

    def __init__(
        self,
        model: "str | PreTrainedModel",
        args: AlignmentConfig | TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: Any = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        quantization_config: Any = None,
        peft_config: Any = None,
        formatting_func: Callable[[dict], str] | None = None,
        alignment_dataset: Dataset | None = None,
    ):
        args = _as_alignment_config(args, model)
        _ = args.distributed_state  # sets up the accelerate state: from here on, logs come from the main process only
        _check_alignment_setup(args)
        check_output_dir(args.output_dir)
        check_dataset_kind(train_dataset, "train_dataset")
        check_dataset_kind(eval_dataset, "eval_dataset", allow_dict=True)
        check_dataset_kind(alignment_dataset, "alignment_dataset")
        _no_batch_dispatch(args, train_dataset, eval_dataset)

        # The model, loaded here when given by name: its depth (and, for align_layer="auto", a probe) gives the layer
        model_init_kwargs = args.model_init_kwargs
        if isinstance(model, str):
            model, processing_class = load_model_for_training(model, args, quantization_config, processing_class)
            quantization_config = None
        else:
            model = prepare_gguf_model(model)
        check_decoder_only_lm(model, meta_allowed=_fsdp_version(args) is not None)

        # The training rows with their pairs (or the pairs alone, for an alignment-only module), the evaluation sets
        probe_pairs = alignment_dataset if alignment_dataset is not None else train_dataset
        pairs_only = train_dataset is None and alignment_dataset is not None
        train_dataset = attach_alignment_dataset(train_dataset, alignment_dataset, args)
        if pairs_only:  # already in their final form
            args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        eval_datasets = named_datasets(eval_dataset)
        for name, dataset in eval_datasets.items():
            check_eval_dataset(dataset, args, name)
        # TRL's preparation may drop rows: the sizes given, to say so after it (packing changes them by design)
        given_rows = len(train_dataset) if isinstance(train_dataset, Dataset) and not args.packing else None
        given_eval_rows = {name: len(d) if isinstance(d, Dataset) else None for name, d in eval_datasets.items()}

        # The aligned layer, known before SFTTrainer creates an adapter from peft_config
        self.num_layers = num_decoder_layers(model)
        self.align_probe = None
        if args.align_layer == "auto":
            self.align_probe = self._probe_for_layer(model, processing_class, probe_pairs, args)
            self.align_layer = self.align_probe.recommended_layer
        else:
            self.align_layer = resolve_layer(args.align_layer, self.num_layers)
        peft_config = _adapter_config_below_layer(peft_config, model, args, self.align_layer)

        # Metric bookkeeping read by `log`, which Trainer may call as soon as it exists
        self._eval_metric_prefix = "eval"
        self._evaluate_depth = 0
        self._steps_without_negatives = {"train": [0, 0], "eval": [0, 0]}  # [without a negative, alignment steps]
        self._warned_single_pair_eval = False
        # Number of training micro-batches seen: its parity is the phase of the alternate schedule. Saved in checkpoints.
        self._align_micro_step = 0
        self._window_align_steps = 1

        args.model_init_kwargs = None  # used above; SFTTrainer would warn that they are ignored for a loaded model
        try:
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_loss_func=compute_loss_func,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                quantization_config=quantization_config,
                peft_config=peft_config,
                formatting_func=formatting_func,
            )
        finally:
            args.model_init_kwargs = model_init_kwargs

        if self.padding_free:
            _check_padding_free_attention(self.model)
        self._align_padding_free = _align_padding_free(self.model, args.align_padding_free)
        # How the task loss is computed: the LM head on the label positions only, or TRL's fused head (and why)
        self._labels_only_head_reason = labels_only_head_unsupported(self, self.model)
        if self._labels_only_head_reason is not None and args.lm_head_on_labels_only:
            logger.info(f"The task loss uses TRL's fused LM head: {self._labels_only_head_reason}.")
        # Callbacks get no trainer from transformers; a layer probe needs this one to log through
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, LayerProbeCallback) and callback.trainer is None:
                callback.set_trainer(self)
        # The data the training will really see, after TRL's preparation
        check_prepared_dataset(self.train_dataset, args, "train", given_rows, warn=alignment_dataset is None)
        for name, dataset in named_datasets(self.eval_dataset).items():
            if isinstance(dataset, Dataset) and len(dataset) == 0:
                raise ValueError(all_rows_dropped_message(args, name, given_eval_rows.get(name)))

        self.data_collator = DataCollatorForAlignment(
            tokenizer=self._tokenizer,
            task_collator=self.data_collator,
            source_column=args.align_source_column,
            target_column=args.align_target_column,
            max_length=args.align_max_length,
        )
        logger.info(
            f"Aligning layer {self.align_layer} of {self.num_layers} (align_layer={args.align_layer!r}) with the "
            f"{args.align_schedule!r} schedule."
        )

    def _probe_for_layer(
        self, model: nn.Module, processing_class: Any, pairs: Dataset | IterableDataset, args: AlignmentConfig
    ) -> ProbeResult:
        """Probe the base model on a sample of the pairs, per language; `align_layer="auto"` takes the best layer."""
        if any(getattr(p, "ds_id", None) is not None and p.numel() == 0 for p in model.parameters()):
            raise ValueError(
                "align_layer='auto' probes the model before training, but its parameters are already partitioned by "
                "DeepSpeed ZeRO-3 (zero3_init_flag). Probe it once with `trl-midalign probe` and set align_layer to "
                "the recommended layer, or disable zero3_init_flag."
            )
        _place_for_probe(model, args)
        if isinstance(pairs, IterableDataset):  # a stream: its first pairs (shuffling a stream only shuffles shards)
            sample = list(pairs.take(args.align_auto_num_pairs))
        else:
            sample = pairs.shuffle(seed=args.seed).select(range(min(len(pairs), args.align_auto_num_pairs)))
        result = probe_layers(
            model,
            processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class,
            sample,
            batch_size=args.per_device_eval_batch_size * 4,
            max_length=args.align_max_length,
            source_column=args.align_source_column,
            target_column=args.align_target_column,
            pooling=args.align_pooling,
            show_progress=False,
        )
        if result.recommended_layer is None:
            raise ValueError(
                f"align_layer='auto' probed {len(sample)} training pairs. {no_recommendation_reason(result)}"
            )
        logger.warning(
            f"align_layer='auto': layer {result.recommended_layer} of {self.num_layers} has the best mean retrieval "
            f"accuracy of the base model on {len(sample)} training pairs:\n{result.to_markdown()}"
        )
        return result

    # ----------------------------------------------------------------------------------------------------------------
    # Data
    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """As [`~trl.SFTTrainer`], except that packing keeps the alignment pairs (see [`pack_with_pairs`])."""
        if not packing or not has_pair_columns(dataset, args):
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

        def prepare_unpacked(rows: Dataset, unpacked_args: AlignmentConfig) -> Dataset:
            return super(AlignmentTrainer, self)._prepare_dataset(
                rows, processing_class, unpacked_args, False, formatting_func, dataset_name
            )

        return pack_with_pairs(dataset, args, dataset_name, prepare_unpacked)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in (self.args.align_source_column, self.args.align_target_column):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    @contextlib.contextmanager
    def _pairs_optional(self):
        """Let the collator build task-only batches (evaluation sets without pairs) while a data loader is made."""
        collator = self.data_collator
        if isinstance(collator, DataCollatorForAlignment) and collator.require_pairs:
            self.data_collator = dataclasses.replace(collator, require_pairs=False)
        try:
            yield
        finally:
            self.data_collator = collator

    def get_eval_dataloader(self, eval_dataset: str | Dataset | None = None):
        dataset = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset
        dataset = self.eval_dataset if dataset is None else dataset
        if isinstance(dataset, Dataset) and len(dataset) == 0:
            name = eval_dataset if isinstance(eval_dataset, str) else self._eval_metric_prefix
            raise ValueError(all_rows_dropped_message(self.args, name, None))
        with self._pairs_optional():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset: Dataset):
        with self._pairs_optional():
            return super().get_test_dataloader(test_dataset)

    def evaluate(
        self,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | str | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """
        Evaluate as [`~trl.SFTTrainer.evaluate`]: the task loss on every evaluation set, the alignment loss on the sets
        that carry pairs. The metrics of a set of a dict are named with its key (`eval_<name>_align_loss`).
        """
        if self._evaluate_depth == 0 and eval_dataset is not None and not isinstance(eval_dataset, str):
            check_dataset_kind(eval_dataset, "eval_dataset", allow_dict=True)
            datasets = eval_dataset if isinstance(eval_dataset, dict) else {metric_key_prefix: eval_dataset}
            for name, dataset in datasets.items():
                check_eval_dataset(dataset, self.args, name)
        previous = self._eval_metric_prefix
        self._eval_metric_prefix = metric_key_prefix
        self._evaluate_depth += 1
        try:
            return super().evaluate(
                eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
            )
        finally:
            self._evaluate_depth -= 1
            self._eval_metric_prefix = previous

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = self._eval_metric_prefix if mode == "eval" else ""
        without, steps = self._steps_without_negatives[mode]
        if steps:
            logs[f"{prefix}_align_steps_without_negatives" if prefix else "align_steps_without_negatives"] = without
            if without:
                where = "since the last log" if mode == "train" else f"of this evaluation ({prefix})"
                logger.warning(
                    f"{without} of the {steps} alignment batches {where} had no valid negative: every other pair of "
                    "the batch repeats its source or its target sentence and is masked as a duplicate, so their "
                    "align_loss is exactly 0.0 and they align nothing. Use more distinct pairs (for example an "
                    "alignment_dataset at least as large as the train dataset, deduplicated) or larger batches."
                )
            self._steps_without_negatives[mode] = [0, 0]
        if mode == "eval" and prefix != "eval":
            # SFTTrainer names the extra metrics `eval_*` whatever the set: name them after the set of a dict instead
            metrics = self._metrics["eval"]
            logs.update({f"{prefix}_{key}": sum(values) / len(values) for key, values in metrics.items() if values})
            metrics.clear()
        super().log(logs, start_time)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.args.align_schedule == "alternate":
            # Normalise the task loss over the task micro-batches of this accumulation window only, and the alignment
            # loss over its alignment micro-batches, so both terms are means whatever the accumulation.
            schedule, start = self.args.align_schedule, self._align_micro_step
            task_flags = [is_task_step(schedule, start + i) for i in range(len(batch_samples))]
            task_batches = [batch for batch, is_task in zip(batch_samples, task_flags) if is_task]
            num_items_in_batch = self._get_num_items_in_batch(task_batches, device) if task_batches else None
            self._window_align_steps = max(1, task_flags.count(False))
        else:
            self._window_align_steps = max(1, len(batch_samples))
        return batch_samples, num_items_in_batch

    # ----------------------------------------------------------------------------------------------------------------
    # Loss
    def _alignment_loss(self, model: nn.Module, pair: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pool both sides of the pairs at the aligned layer (one truncated forward) and return the contrastive loss."""
        source, target = self._pooled_pairs(model, pair).chunk(2)  # (batch, hidden) each
        return self._pair_loss(source, target, pair)

    def _pooled_pairs(self, model: nn.Module, pair: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled states at the aligned layer of the rows of `pair["align_input_ids"]`: `(rows, hidden)`."""
        if self._align_padding_free:
            row_tokens = max(self.args.align_max_length, pair["align_input_ids"].size(1))
            states = packed_layer_hidden_states(
                model, pair["align_input_ids"], pair["align_attention_mask"], self.align_layer, row_tokens
            )  # (rows, seq, hidden), zeros at the padding
        else:
            states = layer_hidden_states(
                model, pair["align_input_ids"], pair["align_attention_mask"], self.align_layer
            )  # (rows, seq, hidden)
        return pool(
            states, pair["align_attention_mask"], self.args.align_pooling, pair["align_special_tokens_mask"]
        )  # (rows, hidden)

    def _pair_loss(self, source: torch.Tensor, target: torch.Tensor, pair: dict[str, torch.Tensor]) -> torch.Tensor:
        args = self.args
        gather = args.align_gather_negatives and self.model.training
        return contrastive_alignment_loss(
            source,
            target,
            temperature=args.align_temperature,
            directions=args.align_directions,
            stop_gradient=args.align_stop_gradient,
            same_pair_mask=None if gather else pair["align_same_pair"],
            pair_ids=pair["align_pair_ids"] if gather else None,
            gather_across_devices=gather,
        )

    def _cached_alignment_loss(self, model: nn.Module, pair: dict[str, torch.Tensor]) -> torch.Tensor:
        """
        `align_mini_batch_size`: the alignment loss by gradient caching. Each mini-batch (its sources and targets in
        one truncated forward, as uncached) runs inside its own wrapper forward, in both passes; under DDP the second
        passes of all mini-batches but the last skip the gradient all-reduce (`no_sync`), as accumulation steps do.
        """
        size = self.args.align_mini_batch_size
        num_pairs = pair["align_input_ids"].size(0) // 2
        starts = list(range(0, num_pairs, size))
        keys = ("align_input_ids", "align_attention_mask", "align_special_tokens_mask")

        def embed(unwrapped: nn.Module, k: int) -> torch.Tensor:
            start, end = starts[k], min(starts[k] + size, num_pairs)
            rows = torch.cat([torch.arange(start, end), torch.arange(num_pairs + start, num_pairs + end)])
            rows = rows.to(pair["align_input_ids"].device)
            length = int(pair["align_attention_mask"][rows].sum(dim=1).max())  # right padding of this mini-batch
            return self._pooled_pairs(unwrapped, {key: pair[key][rows, :length] for key in keys})  # (2 * m, hidden)

        def loss_fn(pooled: list[torch.Tensor]) -> torch.Tensor:
            sources, targets = zip(*(chunk.chunk(2) for chunk in pooled))
            return self._pair_loss(torch.cat(sources), torch.cat(targets), pair)

        def chunk_context(k: int):
            # DDP reduces gradients once, after the last mini-batch, unless the whole step is an accumulation step
            if isinstance(model, nn.parallel.DistributedDataParallel) and k < len(starts) - 1:
                return model.no_sync()
            return contextlib.nullcontext()

        return gradient_cached_loss(
            lambda k: self._in_one_forward(model, embed, k),
            len(starts),
            loss_fn,
            chunk_context=chunk_context,
            device=pair["align_input_ids"].device,
        )

    def _task_and_alignment_loss(self, model, inputs, pair, num_items_in_batch):
        task_loss, _ = self._task_loss(model, inputs, False, num_items_in_batch)
        return task_loss, self._alignment_loss(model, pair)

    def _task_loss(self, model, inputs, return_outputs, num_items_in_batch):
        # The LM head on the label positions only where that is exact, else SFTTrainer.compute_loss (task_loss.py)
        return compute_task_loss(self, model, inputs, return_outputs, num_items_in_batch)

    def _in_one_forward(self, model: nn.Module, method: Callable, *args):
        """
        Run `method(unwrapped_model, *args)` inside a single forward of the outermost module that owns the parameters:
        the DDP wrapper or DeepSpeed engine, or the model itself. FSDP2 shards in place (the model is its own wrapper),
        and only a call through the root module's forward gathers the root's parameters (the embeddings) first.
        """
        unwrapped = self.accelerator.unwrap_model(model)
        return _ForwardRedirection()(model, unwrapped, method, unwrapped, *args)

    def _loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Mirrors `Trainer.training_step`: when True, Trainer does not divide the returned loss by the accumulation
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (
            self.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or self.compute_loss_func is not None

    def _task_loss_value(self, loss: torch.Tensor, inputs: dict, num_items_in_batch) -> torch.Tensor:
        """The per-token task loss of this micro-batch, undoing the normalisation over the accumulation window."""
        if num_items_in_batch is None:
            return loss.detach()
        local_tokens = inputs["labels"][..., 1:].ne(-100).sum().clamp(min=1)
        processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return loss.detach() * num_items_in_batch / (processes * local_tokens)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        pair = {key: inputs.pop(key) for key in PAIR_KEYS if key in inputs}
        is_task, pair = self._scheduled_parts(mode, inputs, pair)
        task_loss, align_loss, outputs = self._losses(
            model, inputs, pair, is_task, mode, return_outputs, num_items_in_batch
        )
        loss = self._log_and_combine(mode, task_loss, align_loss, inputs, pair, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _scheduled_parts(self, mode: str, inputs: dict, pair: dict) -> tuple[bool, dict]:
        """
        What this micro-batch trains or evaluates, as the schedule says: whether it has a task loss, and the pairs of
        its alignment loss (empty: none).
        """
        schedule = self.args.align_schedule
        has_task, has_pairs = "input_ids" in inputs, bool(pair)
        if mode == "train":
            is_task = is_task_step(schedule, self._align_micro_step)
            is_align = is_alignment_step(schedule, self._align_micro_step)
            self._align_micro_step += 1
        else:
            if has_pairs and pair["align_input_ids"].size(0) < 4 and has_task and schedule != "alignment_only":
                # A trailing evaluation batch of one pair has no negative: evaluate its task loss only
                if not self._warned_single_pair_eval:
                    logger.warning(
                        "An evaluation batch holds a single pair (the last one of the set): its alignment loss is "
                        "skipped, as it has no negative, and eval align_loss averages the other batches. (Said once.)"
                    )
                    self._warned_single_pair_eval = True
                pair, has_pairs = {}, False
            is_task = has_task and schedule != "alignment_only"
            is_align = has_pairs
        check_batch_for_schedule(
            self.args, needs_task=is_task, needs_pairs=is_align, has_task=has_task, has_pairs=has_pairs, mode=mode
        )
        return is_task, pair if is_align else {}

    def _losses(self, model, inputs, pair, is_task, mode, return_outputs, num_items_in_batch):
        """The task loss (or `None`), the alignment loss (or `None`) and the task forward's outputs (or `None`)."""
        outputs = task_loss = align_loss = None
        is_align = bool(pair)
        # Gradient caching only where there is a backward to cache for, and more pairs than one mini-batch; with
        # several processes always, so that every process runs the same collectives even when batch sizes differ
        mini_batch = self.args.align_mini_batch_size
        cached = is_align and torch.is_grad_enabled() and mini_batch is not None
        cached = cached and (pair["align_input_ids"].size(0) // 2 > mini_batch or self.accelerator.num_processes > 1)
        if is_task and is_align and mode == "train" and not cached:
            task_loss, align_loss = self._in_one_forward(
                model, self._task_and_alignment_loss, inputs, pair, num_items_in_batch
            )
            return task_loss, align_loss, None
        if is_task:
            task_loss, outputs = self._task_loss(model, inputs, return_outputs, num_items_in_batch)
        if is_align and cached:
            align_loss = self._cached_alignment_loss(model, pair)
        elif is_align:
            align_loss = self._in_one_forward(model, self._alignment_loss, pair)
        return task_loss, align_loss, outputs

    def _log_and_combine(self, mode, task_loss, align_loss, inputs, pair, num_items_in_batch):
        """Log both losses (stopping on a non-finite one while training) and return the loss to back-propagate."""
        loss = 0.0
        if task_loss is not None:
            loss = task_loss
            task_value = self._task_loss_value(task_loss, inputs, num_items_in_batch)
            task_value = self.accelerator.gather_for_metrics(task_value).mean().item()
            if mode == "train" and not math.isfinite(task_value):
                raise self._non_finite_loss_error("task", task_value)
            self._metrics[mode]["task_loss"].append(task_value)
        if align_loss is not None:
            align_value = self.accelerator.gather_for_metrics(align_loss.detach()).mean().item()
            if mode == "train" and not math.isfinite(align_value):
                raise self._non_finite_loss_error("alignment", align_value)
            self._metrics[mode]["align_loss"].append(align_value)
            self._count_steps_without_negatives(pair["align_same_pair"], mode)
            # In eval the alternate schedule reports the task loss as `eval_loss` (for early stopping), like the paper
            if mode == "train" or self.args.align_schedule != "alternate":
                scaled = self.args.align_weight * align_loss
                if mode == "train" and self._loss_is_scaled_for_ga(num_items_in_batch):
                    scaled = scaled / self._window_align_steps
                loss = loss + scaled
        if mode == "train" and isinstance(loss, torch.Tensor) and not torch.isfinite(loss.detach()).all():
            raise self._non_finite_loss_error("total", loss.detach().item())
        return loss

    def _count_steps_without_negatives(self, same_pair: torch.Tensor, mode: str) -> None:
        """Count the alignment batches (over all processes) in which every other pair is masked as a duplicate."""
        off_diagonal = ~torch.eye(same_pair.size(0), dtype=torch.bool, device=same_pair.device)
        without = (~same_pair & off_diagonal).any().logical_not().float().reshape(1)  # 1.0: no negative at all
        counts = self.accelerator.gather(without)
        self._steps_without_negatives[mode][0] += int(counts.sum().item())
        self._steps_without_negatives[mode][1] += counts.numel()

    def _non_finite_loss_error(self, which: str, value: float) -> FloatingPointError:
        causes = [
            "a learning rate that makes the weights diverge (lower learning_rate; keep max_grad_norm > 0)",
            "fp16 overflow (train in bf16 or fp32)",
            "non-finite weights in the model passed in",
        ]
        if which != "task":
            causes.insert(
                0,
                f"an align_temperature so small that cosine / temperature overflows (align_temperature="
                f"{self.args.align_temperature}; the paper uses 0.1)",
            )
        return FloatingPointError(
            f"The {which} loss is {value} at global step {self.state.global_step + 1}: training is stopped before "
            "this step updates any weight, so no checkpoint will hold a non-finite result. Likely causes: "
            + "; ".join(causes)
            + ". "
            + resume_advice(self.args.output_dir)
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Checkpoints (their integrity lives in `checkpoints.py`) and model card
    def _save_checkpoint(self, model, trial):
        check_weights_are_finite(self.model, self.state.global_step, self.args.output_dir)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                state = {
                    "align_micro_step": self._align_micro_step,
                    "align_layer": self.align_layer,
                    "align_schedule": self.args.align_schedule,
                }
                write_alignment_state(folder, state)  # written last: a checkpoint with this file is complete
        except Exception as error:  # safetensors, torch and the OS each report a full disk their own way
            full = no_space_error(error, folder)
            if full is None:
                raise
            raise full from error

    def _take_output_dir(self) -> str | None:
        """The main process takes the lock of `output_dir` (see [`acquire_output_dir_lock`]); all refuse together."""
        lock, refusal = None, None
        if self.is_world_process_zero():
            try:
                lock = acquire_output_dir_lock(self.args.output_dir)
            except RuntimeError as error:
                refusal = str(error)
        if self.accelerator.num_processes > 1:
            refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise RuntimeError(refusal)
        return lock

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """
        Train as [`~trl.SFTTrainer.train`]. While it trains, the run holds a lock file in `output_dir`
        (`_trl-midalign.lock`, naming its pid, host and start time): a second run started in the same folder is
        refused; a lock left by a run of this host that died is taken over with a warning.
        """
        lock = self._take_output_dir()
        try:
            checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
            if checkpoint is not None:
                self._align_micro_step = restore_alignment_state(
                    checkpoint, self.args.output_dir, self.align_layer, self.args.align_schedule
                )
            elif self.is_world_process_zero():
                warn_about_earlier_checkpoints(self.args.output_dir, self.args.save_total_limit)
            return super().train(checkpoint, *args, **kwargs)
        finally:
            if lock is not None:
                release_output_dir_lock(lock)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ):
        """
        Write the model card of [`~trl.SFTTrainer`] (with the paper and tags) plus the alignment section and metadata
        (see [`~trl_midalign.model_card.alignment_section`]).
        """
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        settings = {name: getattr(self.args, name) for name in sorted(vars(self.args)) if name.startswith("align_")}
        section, metadata = alignment_section(settings, self.align_layer, self.num_layers)
        update_card(self.args.output_dir, "alignment", section, metadata)
