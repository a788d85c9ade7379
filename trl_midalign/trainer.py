import contextlib
import dataclasses
import json
import logging
import os
import textwrap
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset, IterableDataset, concatenate_datasets
from peft import LoraConfig
from torch import nn
from transformers import PreTrainedModel, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import SFTTrainer
from trl.models.utils import _ForwardRedirection

from .collator import PAIR_KEYS, DataCollatorForAlignment, check_sentence
from .config import AlignmentConfig
from .layers import get_decoder_layers, layer_hidden_states, num_decoder_layers, resolve_layer
from .losses import contrastive_alignment_loss, gradient_cached_loss, last_token_pool, masked_mean_pool
from .modeling import load_causal_lm, load_tokenizer, prepare_gguf_model
from .probing import LayerProbeCallback, ProbeResult, probe_layers


logger = logging.getLogger(__name__)

STATE_FILE = "alignment_state.json"


def _check_pair_columns(dataset: Dataset | IterableDataset, args: AlignmentConfig, name: str) -> None:
    """Fail early, naming the column, the row and the fix, when a dataset's alignment pairs are missing or empty."""
    columns = dataset.column_names
    missing = [c for c in (args.align_source_column, args.align_target_column) if c not in (columns or [])]
    if columns is not None and missing:
        raise ValueError(
            f"The {name} dataset has no column {missing[0]!r} for the alignment pairs (its columns: {columns}). Give "
            f"each row a non-English sentence in {args.align_source_column!r} and its English translation in "
            f"{args.align_target_column!r}, pass the pairs separately as `alignment_dataset=`, or point "
            "align_source_column / align_target_column at your columns (for the reference's files: "
            "text_parallel_0 / text_parallel_1)."
        )
    if isinstance(dataset, Dataset):  # an IterableDataset is checked batch by batch in the collator
        for column in (args.align_source_column, args.align_target_column):
            for row, value in enumerate(dataset[column]):
                check_sentence(value, column, f"{row} of the {name} dataset")


def _attach_pairs(rows: Dataset | None, pairs: Dataset, per_row: int, args: AlignmentConfig) -> Dataset:
    """
    `align_batch_size`: give each training row `per_row` pairs as lists, taken in turn from `pairs` (cycled when they
    run out). Without rows (an alignment-only run on pairs alone), group consecutive pairs into rows instead.
    """
    source, target = args.align_source_column, args.align_target_column
    if rows is None:
        count = len(pairs) // per_row
        if count < 1:
            raise ValueError(
                f"align_batch_size={args.align_batch_size} needs {per_row} pairs per row, but there are only "
                f"{len(pairs)} pairs. Lower align_batch_size or add pairs."
            )
        indices = [[r * per_row + j for j in range(per_row)] for r in range(count)]
    else:
        if not isinstance(rows, Dataset):
            raise TypeError(
                f"align_batch_size attaches several pairs to each training row, which needs a map-style "
                f"`train_dataset` (datasets.Dataset), got {type(rows).__name__}; leave align_batch_size unset."
            )
        count = len(rows)
        indices = [[(r * per_row + j) % len(pairs) for j in range(per_row)] for r in range(count)]
    sources, targets = pairs[source], pairs[target]
    attached = Dataset.from_dict(
        {
            source: [[sources[i] for i in row] for row in indices],
            target: [[targets[i] for i in row] for row in indices],
        }
    )
    slots = count * per_row
    logger.info(
        f"align_batch_size={args.align_batch_size}: each training row carries {per_row} pairs, so an epoch uses "
        f"{slots} pair slots of {len(pairs)} distinct pairs."
    )
    if slots > len(pairs):
        logger.warning(
            f"align_batch_size={args.align_batch_size} uses {slots} pair slots per epoch but there are only "
            f"{len(pairs)} distinct pairs: each pair is seen about {slots / len(pairs):.1f} times per epoch."
        )
    elif rows is None and slots < len(pairs):
        logger.warning(f"{len(pairs) - slots} pairs do not fill a row of {per_row} pairs and are never used.")
    return attached if rows is None else concatenate_datasets([rows, attached], axis=1)


class AlignmentTrainer(SFTTrainer):
    """
    [`~trl.SFTTrainer`] with the middle-layer representation alignment of Liu & Niehues (2025): alongside the task
    loss, parallel sentences are pulled together at a middle layer by a contrastive loss, which improves transfer of
    the task to languages without task data.

    Swapping `SFTTrainer` for `AlignmentTrainer` in an SFT script is the only change needed, once every training row
    carries a parallel pair (columns `parallel_source`, the non-English sentence, and `parallel_target`, its English
    translation) or the pairs come as a separate `alignment_dataset`. Every dataset format of `SFTTrainer` works (text,
    prompt-completion, conversational); packing and padding-free batches are refused, as they drop the pairs.

    The pair's states at `align_layer` come from a forward that runs only the blocks below the layer and never the
    LM head; both sides run in one batched forward. Under DDP or DeepSpeed that forward runs inside one forward of the
    wrapped model, so every backward matches exactly one wrapper forward.

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
            settings). A `data_collator` is wrapped so that it still builds the task part of each batch.
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
        # Args: anything else becomes an AlignmentConfig with default align_* settings
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = AlignmentConfig(f"{(model_name or 'model').split('/')[-1]}-MidAlign")
        elif not isinstance(args, AlignmentConfig):
            # Copy the fields themselves: `to_dict` masks every `*_token` field (hub_token, eos_token, pad_token)
            values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
            args = AlignmentConfig(**values)

        # Models from GGUF files: loaded dequantized, without the leftover quantizer that blocks training and saving
        if isinstance(model, str) and (model.endswith(".gguf") or "gguf_file" in (args.model_init_kwargs or {})):
            model_init_kwargs = dict(args.model_init_kwargs or {})
            if processing_class is None:
                processing_class = load_tokenizer(model, gguf_file=model_init_kwargs.get("gguf_file"))
            model = load_causal_lm(model, **model_init_kwargs)
        elif not isinstance(model, str):
            model = prepare_gguf_model(model)

        # Training data: the task rows with their pairs, or the pairs alone for an alignment-only module
        source, target = args.align_source_column, args.align_target_column
        if alignment_dataset is not None:
            if not isinstance(alignment_dataset, Dataset):
                raise TypeError(
                    f"`alignment_dataset` must be a datasets.Dataset, got {type(alignment_dataset).__name__}; load "
                    "it with `datasets.load_dataset(...)` or `Dataset.from_list(...)`."
                )
            _check_pair_columns(alignment_dataset, args, "alignment")
            if len(alignment_dataset) < 2:
                raise ValueError(
                    f"`alignment_dataset` has {len(alignment_dataset)} pair(s); the contrastive loss needs at least 2."
                )
            pairs = alignment_dataset.select_columns([source, target]).shuffle(seed=args.seed)
        # align_layer="auto" probes these pairs per language (the language column is dropped from the training rows)
        probe_pairs = alignment_dataset if alignment_dataset is not None else train_dataset
        pairs_per_row = (args.align_batch_size or args.per_device_train_batch_size) // args.per_device_train_batch_size
        if train_dataset is None and alignment_dataset is not None and args.align_schedule == "alignment_only":
            train_dataset = pairs if pairs_per_row == 1 else _attach_pairs(None, pairs, pairs_per_row, args)
            args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        elif alignment_dataset is not None:
            if not isinstance(train_dataset, Dataset):
                raise TypeError(
                    "`alignment_dataset` is attached row by row to the training rows, which needs a map-style "
                    f"`train_dataset` (datasets.Dataset), got {type(train_dataset).__name__}. Put the pairs in the "
                    "training rows instead."
                )
            clash = [c for c in (source, target) if c in train_dataset.column_names]
            if clash:
                raise ValueError(
                    f"The train dataset already has the pair column {clash[0]!r} and an `alignment_dataset` was passed "
                    "too; keep the pairs in one place (drop the columns or the alignment_dataset)."
                )
            if len(pairs) > pairs_per_row * len(train_dataset):
                logger.warning(
                    f"alignment_dataset has {len(pairs)} pairs but the train dataset only {len(train_dataset)} rows: "
                    f"each epoch uses the same {pairs_per_row * len(train_dataset)} pairs; the rest are never seen."
                )
            if pairs_per_row > 1:
                train_dataset = _attach_pairs(train_dataset, pairs, pairs_per_row, args)
            else:
                cycled = pairs.select([i % len(pairs) for i in range(len(train_dataset))])
                train_dataset = concatenate_datasets([train_dataset, cycled], axis=1)
        elif train_dataset is not None:
            _check_pair_columns(train_dataset, args, "train")
            if pairs_per_row > 1:  # the rows' own pairs, dealt out again several to a row
                row_pairs = train_dataset.select_columns([source, target])
                train_dataset = _attach_pairs(train_dataset.remove_columns([source, target]), row_pairs,
                                              pairs_per_row, args)  # fmt: skip
        if isinstance(train_dataset, Dataset) and not args.dataloader_drop_last and pairs_per_row == 1:
            if len(train_dataset) % args.per_device_train_batch_size == 1 and args.world_size == 1:
                raise ValueError(
                    f"With {len(train_dataset)} rows and per_device_train_batch_size="
                    f"{args.per_device_train_batch_size}, the last batch of each epoch holds a single pair, which "
                    "has no negative for the contrastive loss. Set dataloader_drop_last=True or change the batch size."
                )

        self._eval_has_pairs = {}
        eval_datasets = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
        for name, dataset in eval_datasets.items():
            if dataset is None:
                continue
            has_pairs = source in (dataset.column_names or []) and target in (dataset.column_names or [])
            self._eval_has_pairs[name] = has_pairs
            if has_pairs:
                _check_pair_columns(dataset, args, name)
                if args.per_device_eval_batch_size < 2:
                    raise ValueError(
                        f"per_device_eval_batch_size={args.per_device_eval_batch_size}: evaluating the alignment loss "
                        "needs at least 2 pairs per batch. Raise it to 2 or more."
                    )
            elif args.align_schedule == "alignment_only":
                raise ValueError(
                    f"align_schedule='alignment_only' evaluates the alignment loss, but the {name} dataset has no "
                    f"{source!r}/{target!r} columns. Give it pairs or drop it."
                )
            else:
                logger.warning(f"The {name} dataset has no alignment pairs; eval_align_loss is not computed on it.")

        # Only an adapter created here from `peft_config` is cut down to the blocks an alignment-only module trains; a
        # PEFT model passed in (for example an adapter trained before) keeps all its modules
        created_adapter = peft_config is not None and not hasattr(model, "peft_config")

        # An alignment step leaves the blocks above the aligned layer (and the LM head) without gradients, so DDP
        # must look for unused parameters in every schedule that has alignment-only steps.
        if args.align_schedule != "joint":
            if args.ddp_find_unused_parameters is False:
                raise ValueError(
                    f"align_schedule={args.align_schedule!r} runs alignment steps that leave the blocks above the "
                    "aligned layer unused, which DDP only accepts with ddp_find_unused_parameters=True. Leave it unset "
                    "or set it to True (or use align_schedule='joint')."
                )
            args.ddp_find_unused_parameters = True

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

        if args.align_mini_batch_size is not None:
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError(
                    f"align_mini_batch_size={args.align_mini_batch_size} (gradient caching) is not supported under "
                    f"{'DeepSpeed' if self.is_deepspeed_enabled else 'FSDP'}: its second forward runs inside the "
                    "backward, which these engines' gradient reduction does not expect. Use DDP or one process, or "
                    "leave align_mini_batch_size unset (align_gather_negatives works under both)."
                )
            if args.align_schedule == "joint" and self.accelerator.num_processes > 1:
                raise ValueError(
                    "align_mini_batch_size (gradient caching) with align_schedule='joint' is not supported with "
                    "several processes: the cached alignment backward would run DDP forwards inside the task's DDP "
                    "backward. Use align_schedule='alternate' (or 'alignment_only'), or one process."
                )

        # Callbacks get no trainer from transformers; a layer probe needs this one to log through
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, LayerProbeCallback) and callback.trainer is None:
                callback.set_trainer(self)

        self.num_layers = num_decoder_layers(self.model)
        self.align_probe = None
        if args.align_layer == "auto":
            self.align_probe = self._probe_for_layer(probe_pairs)
            self.align_layer = self.align_probe.recommended_layer
        else:
            self.align_layer = resolve_layer(args.align_layer, self.num_layers)
        if args.align_schedule == "alignment_only" and created_adapter:
            self._restrict_lora_to_blocks_below(self.align_layer)
        self.data_collator = DataCollatorForAlignment(
            tokenizer=self._tokenizer,
            task_collator=self.data_collator,
            source_column=source,
            target_column=target,
            max_length=args.align_max_length,
            pooling=args.align_pooling,
        )
        # Number of training micro-batches seen: its parity is the phase of the alternate schedule. Saved in checkpoints.
        self._align_micro_step = 0
        self._window_align_steps = 1
        logger.info(
            f"Aligning layer {self.align_layer} of {self.num_layers} (align_layer={args.align_layer!r}) with the "
            f"{args.align_schedule!r} schedule."
        )

    def _restrict_lora_to_blocks_below(self, layer: int) -> None:
        """
        An alignment-only module changes only the blocks below the aligned layer (the blocks above never run): keep
        the new LoRA adapter on those blocks only and say so in its config (`layers_to_transform`), so that the saved
        adapter holds them alone and merges with a task adapter as what it is. An explicit `layers_to_transform` is
        kept. Done before training, while the LoRA weights above the layer are still at their initial (zero) delta.
        """
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer

        if not isinstance(self.model, PeftModel):
            return
        name = self.model.active_adapter
        config = self.model.peft_config[name]
        if not isinstance(config, LoraConfig) or config.layers_to_transform is not None:
            return
        tuner = self.model.base_model
        removed = 0
        for index, block in enumerate(get_decoder_layers(self.model)):
            if index < layer:
                continue
            for module_name, module in list(block.named_modules()):
                if isinstance(module, LoraLayer):
                    removed += 1
                    parent_name, _, child = module_name.rpartition(".")
                    setattr(block.get_submodule(parent_name), child, module.get_base_layer())
        if not removed:
            return
        kept = {module_name for module_name, module in tuner.model.named_modules() if isinstance(module, LoraLayer)}
        if isinstance(getattr(tuner, "targeted_module_names", None), list):
            tuner.targeted_module_names = [n for n in tuner.targeted_module_names if n in kept]
        # a copy: PEFT keeps the caller's LoraConfig object, which must stay as the caller wrote it
        self.model.peft_config[name] = dataclasses.replace(config, layers_to_transform=list(range(layer)))

    def _probe_for_layer(self, pairs: Dataset) -> ProbeResult:
        """Probe the base model on a sample of the pairs, per language; `align_layer="auto"` takes the best layer."""
        args = self.args
        if any(getattr(p, "ds_id", None) is not None and p.numel() == 0 for p in self.model.parameters()):
            raise ValueError(
                "align_layer='auto' probes the model before training, but its parameters are already partitioned by "
                "DeepSpeed ZeRO-3 (zero3_init_flag). Probe it once with `trl-midalign probe` and set align_layer to "
                "the recommended layer, or disable zero3_init_flag."
            )
        sample = pairs.shuffle(seed=args.seed).select(range(min(len(pairs), args.align_auto_num_pairs)))
        result = probe_layers(
            self.model,
            self._tokenizer,
            sample,
            batch_size=args.per_device_eval_batch_size * 4,
            max_length=args.align_max_length,
            source_column=args.align_source_column,
            target_column=args.align_target_column,
            show_progress=False,
        )
        logger.warning(
            f"align_layer='auto': layer {result.recommended_layer} of {self.num_layers} has the best mean retrieval "
            f"accuracy of the base model on {len(sample)} training pairs:\n{result.to_markdown()}"
        )
        return result

    # ----------------------------------------------------------------------------------------------------------------
    # Data
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in (self.args.align_source_column, self.args.align_target_column):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _is_task_step(self, micro_step: int) -> bool:
        schedule = self.args.align_schedule
        return schedule == "joint" or (schedule == "alternate" and micro_step % 2 == 0)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.args.align_schedule == "alternate":
            # Normalise the task loss over the task micro-batches of this accumulation window only, and the alignment
            # loss over its alignment micro-batches, so both terms are means whatever the accumulation.
            task_flags = [self._is_task_step(self._align_micro_step + i) for i in range(len(batch_samples))]
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
        states = layer_hidden_states(
            model, pair["align_input_ids"], pair["align_attention_mask"], self.align_layer
        )  # (rows, seq, hidden)
        if self.args.align_pooling == "last":
            return last_token_pool(states, pair["align_attention_mask"])
        return masked_mean_pool(states, pair.get("align_pool_mask", pair["align_attention_mask"]))

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
        keys = [key for key in ("align_input_ids", "align_attention_mask", "align_pool_mask") if key in pair]

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
        task_loss = SFTTrainer.compute_loss(self, model, inputs, num_items_in_batch=num_items_in_batch)
        return task_loss, self._alignment_loss(model, pair)

    def _in_one_forward(self, model: nn.Module, method: Callable, *args):
        """Run `method(unwrapped_model, *args)` inside a single forward of the DDP/DeepSpeed wrapper, if any."""
        unwrapped = self.accelerator.unwrap_model(model)
        if model is unwrapped:
            return method(unwrapped, *args)
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
        schedule = self.args.align_schedule
        weight = self.args.align_weight
        has_task = "input_ids" in inputs

        if mode == "train":
            is_task = self._is_task_step(self._align_micro_step)
            is_align = schedule != "alternate" or not is_task
            self._align_micro_step += 1
        else:
            is_task = has_task and schedule != "alignment_only"
            is_align = bool(pair)
        if is_align and not pair:
            raise ValueError(
                "This batch carries no alignment pairs. Give the rows the columns "
                f"{self.args.align_source_column!r} and {self.args.align_target_column!r}, or pass `alignment_dataset`."
            )
        if is_task and not has_task:
            raise ValueError(
                f"align_schedule={schedule!r} needs task examples, but the batch only holds alignment pairs. Pass task "
                "rows as `train_dataset`, or use align_schedule='alignment_only'."
            )

        outputs = None
        task_loss = align_loss = None
        # Gradient caching only where there is a backward to cache for, and more pairs than one mini-batch; with
        # several processes always, so that every process runs the same collectives even when batch sizes differ
        mini_batch = self.args.align_mini_batch_size
        cached = is_align and torch.is_grad_enabled() and mini_batch is not None
        cached = cached and (pair["align_input_ids"].size(0) // 2 > mini_batch or self.accelerator.num_processes > 1)
        if is_task and is_align and mode == "train" and not cached:
            task_loss, align_loss = self._in_one_forward(
                model, self._task_and_alignment_loss, inputs, pair, num_items_in_batch
            )
        else:
            if is_task:
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                task_loss, outputs = result if return_outputs else (result, None)
            if is_align and cached:
                align_loss = self._cached_alignment_loss(model, pair)
            elif is_align:
                align_loss = self._in_one_forward(model, self._alignment_loss, pair)

        loss = 0.0
        if task_loss is not None:
            loss = task_loss
            task_value = self._task_loss_value(task_loss, inputs, num_items_in_batch)
            self._metrics[mode]["task_loss"].append(self.accelerator.gather_for_metrics(task_value).mean().item())
        if align_loss is not None:
            self._metrics[mode]["align_loss"].append(
                self.accelerator.gather_for_metrics(align_loss.detach()).mean().item()
            )
            # In eval the alternate schedule reports the task loss as `eval_loss` (for early stopping), like the paper
            if mode == "train" or schedule != "alternate":
                scaled = weight * align_loss
                if mode == "train" and self._loss_is_scaled_for_ga(num_items_in_batch):
                    scaled = scaled / self._window_align_steps
                loss = loss + scaled
        return (loss, outputs) if return_outputs else loss

    # ----------------------------------------------------------------------------------------------------------------
    # Checkpoints and model card
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump({"align_micro_step": self._align_micro_step, "align_layer": self.align_layer}, f)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            path = os.path.join(checkpoint, STATE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} is missing: {checkpoint} was not written by AlignmentTrainer, so the phase of the "
                    "alignment schedule cannot be restored. Resume from a checkpoint of this trainer."
                )
            with open(path) as f:
                state = json.load(f)
            if state["align_layer"] != self.align_layer:
                raise ValueError(
                    f"{checkpoint} was trained with align_layer={state['align_layer']}, but this run aligns layer "
                    f"{self.align_layer}; set align_layer={state['align_layer']} to resume it."
                )
            self._align_micro_step = state["align_micro_step"]
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ):
        """Write the model card of [`~trl.SFTTrainer`] (with the paper and tags) plus the alignment settings."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        settings = {name: getattr(self.args, name) for name in sorted(vars(self.args)) if name.startswith("align_")}
        rows = "\n".join(f"| `{name}` | `{value!r}` |" for name, value in settings.items())
        section = (
            "\n## Cross-lingual alignment\n\n"
            f"Trained with trl-midalign's `AlignmentTrainer`: a contrastive loss aligns the representations of "
            f"parallel sentences at layer {self.align_layer} of {self.num_layers} (Liu & Niehues, 2025, "
            "https://huggingface.co/papers/2502.14830).\n\n"
            f"| setting | value |\n|---|---|\n{rows}\n"
        )
        with open(os.path.join(self.args.output_dir, "README.md"), "a") as f:
            f.write(section)
