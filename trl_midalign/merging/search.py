"""[`search_merge_weights`]: choose the weight of one adapter in a merge on a dev set.

Each candidate weight is scored twice: the task loss is TRL's own [`~trl.SFTTrainer.evaluate`] `eval_loss` on the dev
task rows (tokenized and masked exactly as SFT training does), and the alignment is [`probe_layers`]'s retrieval
accuracy at the aligned layer.
"""

import math
import os
import tempfile
from collections.abc import Mapping, Sequence

from datasets import Dataset
from peft import PeftConfig, PeftModel
from transformers import AutoTokenizer, PreTrainedModel, PrinterCallback, ProgressCallback

from .._logging import get_logger
from ..layers import num_decoder_layers, resolve_layer
from ..probing import probe_layers
from .merge import Combination, add_combined_adapter, load_for_merge, prepare_merge


logger = get_logger(__name__)

_TASK_FORMATS = "'prompt' and 'completion', 'text' or 'messages' (the formats TRL's SFTTrainer accepts)"


def _check_task_rows(rows) -> Dataset:
    """The dev task rows as a Dataset, each in a format SFTTrainer accepts (checked before any model is loaded)."""
    rows = rows if isinstance(rows, Dataset) else Dataset.from_list(list(rows))
    columns = set(rows.column_names)
    if not ({"prompt", "completion"} <= columns or "text" in columns or "messages" in columns):
        raise ValueError(f"The task rows have the columns {sorted(columns)}; a task row needs {_TASK_FORMATS}.")
    if len(rows) == 0:
        raise ValueError("task_rows is empty; pass the dev rows of the task (CLI: --dev_file).")
    return rows


def _infer_align_layer(config: PeftConfig, align_layer, num_layers: int) -> int:
    if align_layer is not None:
        return resolve_layer(align_layer, num_layers)
    layers = config.layers_to_transform
    if layers is not None:  # an alignment adapter changes the blocks below the aligned layer, 0 .. L - 1
        layers = [layers] if isinstance(layers, int) else list(layers)
        return min(max(layers) + 1, num_layers)
    return resolve_layer("middle", num_layers)


def _task_evaluator(model: PeftModel, tokenizer, rows: Dataset, batch_size: int, max_length: int, output_dir: str):
    """An SFTTrainer that only evaluates: its `evaluate` gives the task loss of the model's active adapter."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=output_dir,
        per_device_eval_batch_size=batch_size,
        max_length=max_length,
        report_to="none",
        activation_checkpointing=False,
        bf16=False,  # evaluate in the model's own dtype
        fp16=False,
        disable_tqdm=True,
    )
    # SFTTrainer needs a train dataset; nothing is trained, its prepared rows are what `evaluate` scores.
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    for callback in (PrinterCallback, ProgressCallback):  # they print every log line; the caller reports instead
        trainer.remove_callback(callback)
    return trainer


def format_search_table(table: list[dict], search_adapter: str) -> str:
    """
    The result of [`search_merge_weights`] as a Markdown table; the selected weight is marked with `*`.

    Args:
        table (`list[dict]`):
            The rows returned by [`search_merge_weights`].
        search_adapter (`str`):
            Name of the adapter whose weight was searched.

    Returns:
        `str`: The table.
    """
    layer = table[0]["layer"]
    lines = [
        f"| {search_adapter} weight | task loss | change vs 0 | retrieval acc @ layer {layer} | selected |",
        "|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['weight']:g} | {row['task_loss']:.4f} | {100 * row['task_loss_change']:+.2f}% | "
            f"{row['retrieval_accuracy']:.4f} | {'*' if row['selected'] else ''} |"
        )
    return "\n".join(lines)


def search_merge_weights(
    base_model: PreTrainedModel | str | None,
    adapters: Mapping[str, str],
    task_rows,
    pairs,
    tokenizer=None,
    search_adapter: str = "alignment",
    grid: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    weights: Mapping[str, float] | Sequence[float] | None = None,
    combination: Combination = "cat",
    svd_rank: int | None = None,
    align_layer: int | float | str | None = None,
    max_task_loss_increase: float = 0.05,
    batch_size: int = 8,
    max_length: int = 512,
    source_column: str = "parallel_source",
    target_column: str = "parallel_target",
    language_column: str = "language",
) -> tuple[float, list[dict[str, float]]]:
    r"""
    Choose the weight of one adapter (usually the alignment adapter) in a merge, on a dev set.

    For every weight `w` of `grid` (0 is always added: it is the reference, the other adapters alone), the adapters
    are merged as in [`merge_adapters`] with `search_adapter` at weight `w` and two scores are measured:

    - task loss: the `eval_loss` of TRL's [`~trl.SFTTrainer.evaluate`] on `task_rows`, which tokenizes them as SFT
      training does (EOS appended to plain-text completions) and scores the completion tokens (every token of
      `text` / `messages` rows): the mean loss per scored token of each batch of `batch_size` rows, averaged over
      the rows;
    - retrieval accuracy at the aligned layer: [`probe_layers`]'s `retrieval_accuracy["mean"]` at `align_layer`
      (mean over languages of the two retrieval directions).

    Selection rule: among the weights whose task loss is at most `(1 + max_task_loss_increase)` times the task loss
    at weight 0, take the one with the highest retrieval accuracy; ties go to the smaller `|w|`. Weight 0 always
    qualifies, so a search never returns a merge that hurts the task more than allowed.

    The model and adapters are loaded once; each weight adds and removes one merged adapter. Nothing is printed:
    [`format_search_table`] renders the returned table.

    Args:
        base_model ([`~transformers.PreTrainedModel`], `str` or `None`):
            As in [`merge_adapters`] (an instance gets LoRA layers injected).
        adapters (`dict[str, str]`):
            `{name: adapter directory}`, including `search_adapter`.
        task_rows (`datasets.Dataset` or `list[dict]`):
            Dev rows of the task: `prompt` + `completion` (plain or conversational), `text` or `messages`.
        pairs (`datasets.Dataset` or `list[dict]`):
            Parallel pairs for [`probe_layers`] (`source_column`, `target_column`, optional `language_column`).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`] or `None`, *optional*, defaults to `None`):
            The base model's tokenizer; `None` loads it from the base model directory or an adapter directory.
        search_adapter (`str`, *optional*, defaults to `"alignment"`):
            Name (key of `adapters`) of the adapter whose weight is searched.
        grid (`Sequence[float]`, *optional*, defaults to `(0.0, 0.25, 0.5, 0.75, 1.0)`):
            Weights to try for `search_adapter`.
        weights (`dict[str, float]`, `list[float]` or `None`, *optional*, defaults to `None`):
            Fixed weights of the other adapters, as in [`merge_adapters`] (the entry of `search_adapter` is
            ignored); `None` gives them 1.0.
        combination (`str`, *optional*, defaults to `"cat"`):
            `"cat"`, `"svd"` or `"linear"`, see [`merge_adapters`].
        svd_rank (`int` or `None`, *optional*, defaults to `None`):
            Rank for `combination="svd"`.
        align_layer (`int`, `float`, `str` or `None`, *optional*, defaults to `None`):
            Layer to score (see [`resolve_layer`]); `None` takes the layer above the highest block the search
            adapter changes (`max(layers_to_transform) + 1`, the aligned layer of an alignment-only adapter), or the
            middle layer when it covers every block.
        max_task_loss_increase (`float`, *optional*, defaults to `0.05`):
            Largest relative rise of the task loss over weight 0 that a selected weight may cause (0.05 = 5%).
        batch_size (`int`, *optional*, defaults to `8`):
            Rows per forward pass.
        max_length (`int`, *optional*, defaults to `512`):
            Maximum tokens per task row and per sentence of a pair (longer ones are truncated).
        source_column (`str`, *optional*, defaults to `"parallel_source"`):
            Column of `pairs` with the non-English sentence.
        target_column (`str`, *optional*, defaults to `"parallel_target"`):
            Column of `pairs` with its (English) translation.
        language_column (`str`, *optional*, defaults to `"language"`):
            Column of `pairs` with the language; optional.

    Returns:
        `tuple[float, list[dict]]`: The selected weight, and one row per weight (sorted by weight) with keys
        `weight`, `task_loss`, `task_loss_change` (relative to weight 0), `retrieval_accuracy`, `layer` (the scored
        layer) and `selected`.
    """
    if search_adapter not in adapters:
        raise ValueError(
            f"search_adapter={search_adapter!r} is not one of the adapters {list(adapters)}; pass the name of the "
            "adapter whose weight to search (CLI: --search_adapter)."
        )
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not grid:
        raise ValueError(f"grid must be a non-empty list of weights, got {grid!r}.")
    for value in grid:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"grid holds {value!r}; every weight must be a finite number.")
    grid = sorted({0.0, *(float(value) for value in grid)})
    if not (isinstance(max_task_loss_increase, (int, float)) and max_task_loss_increase >= 0):
        raise ValueError(
            f"max_task_loss_increase must be >= 0 (a fraction: 0.05 allows a 5% rise), got {max_task_loss_increase!r}."
        )
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}.")
    task_rows = _check_task_rows(task_rows)
    if isinstance(weights, Mapping):
        weights = {**weights, search_adapter: weights.get(search_adapter, 1.0)}
    prepared = prepare_merge(base_model, adapters, weights, combination, svd_rank, None, False)
    if tokenizer is None:
        source = next((s for s in prepared.sources if os.path.isfile(os.path.join(s, "tokenizer_config.json"))), None)
        if source is None:
            raise ValueError(
                "No tokenizer given and none found in the base model or adapter directories; pass tokenizer=."
            )
        tokenizer = AutoTokenizer.from_pretrained(source)

    peft_model, inputs = load_for_merge(base_model, prepared, combination, svd_rank)
    layer = _infer_align_layer(prepared.configs[search_adapter], align_layer, num_decoder_layers(peft_model))
    table = []
    with tempfile.TemporaryDirectory(prefix="merge-search-") as output_dir:  # the trainer's output_dir, left empty
        evaluator = _task_evaluator(peft_model, tokenizer, task_rows, batch_size, max_length, output_dir)
        for index, value in enumerate(grid):
            name = f"search_{index}"
            add_combined_adapter(
                peft_model, inputs, {**prepared.weights, search_adapter: value}, combination, svd_rank, name, False
            )
            peft_model.set_adapter(name)
            loss = evaluator.evaluate(evaluator.train_dataset)["eval_loss"]
            if not math.isfinite(loss):
                raise ValueError(
                    f"The task loss of weight {value:g} is {loss}: no task row has a token to score within "
                    f"max_length={max_length}. Check the dev rows or raise max_length (CLI: --max_length)."
                )
            probe = probe_layers(
                peft_model,
                tokenizer,
                pairs,
                batch_size=batch_size,
                max_length=max_length,
                source_column=source_column,
                target_column=target_column,
                language_column=language_column,
                show_progress=False,
            )
            accuracy = probe.retrieval_accuracy["mean"][layer]
            table.append({"weight": value, "task_loss": loss, "retrieval_accuracy": accuracy, "layer": layer})
            peft_model.set_adapter(next(iter(inputs.values())))  # deleting the active adapter makes PEFT warn
            peft_model.delete_adapter(name)

    reference = next(row["task_loss"] for row in table if row["weight"] == 0.0)
    for row in table:
        row["task_loss_change"] = row["task_loss"] / reference - 1.0
    eligible = [row for row in table if row["task_loss"] <= reference * (1.0 + max_task_loss_increase)]
    best = max(eligible, key=lambda row: (row["retrieval_accuracy"], -abs(row["weight"])))
    for row in table:
        row["selected"] = row is best
    logger.info(
        f"Weight search for {search_adapter!r} ({combination}): selected {best['weight']:g} (retrieval accuracy "
        f"{best['retrieval_accuracy']:.4f} at layer {layer}, task loss {100 * best['task_loss_change']:+.2f}%)."
    )
    return best["weight"], table
