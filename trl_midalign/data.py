"""The alignment pairs on their way to a batch: validating them, attaching them to the task rows, carrying them
through TRL's packing, and the collator that tokenizes and pads both sides of each pair.

Rows -> [`check_pairs`] / [`attach_alignment_dataset`] -> TRL's dataset preparation ([`pack_with_pairs`] under
packing) -> [`DataCollatorForAlignment`] -> the trainer's `compute_loss`.
"""

import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, concatenate_datasets
from transformers import PreTrainedTokenizerBase
from transformers.data.data_collator import DataCollatorMixin
from trl import pack_dataset
from trl.trainer.utils import pad

from ._logging import get_logger


if TYPE_CHECKING:
    from .config import AlignmentConfig


logger = get_logger(__name__)

PAIR_KEYS = (
    "align_input_ids",
    "align_attention_mask",
    "align_special_tokens_mask",
    "align_same_pair",
    "align_pair_ids",
)
"""The keys the collator adds to a batch; the trainer takes them out before the task forward."""

_ROW_COLUMN = "_align_row"  # row index carried through packing, on the first token of each row

STREAM_CHECK_ROWS = 256
"""How many rows of a streamed (`IterableDataset`) set are read and checked before training, as a `Dataset` is."""

IDENTICAL_PAIRS_REFUSED = 0.9
IDENTICAL_PAIRS_WARNED = 0.05
"""Shares of pairs whose two sides are the same text above which the pairs are refused, or warned about."""

_MISSING_COLUMN_FIX = (
    "Give each row a non-English sentence in {source!r} and its English translation in {target!r}, pass the pairs "
    "separately as `alignment_dataset=`, or point align_source_column / align_target_column at your columns (for "
    "the reference's files: text_parallel_0 / text_parallel_1)."
)


def special_tokens_mask(input_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """
    Mark the special tokens (BOS, EOS, padding, ...) of tokenized sentences.

    Args:
        input_ids (`torch.Tensor`):
            Token ids of any shape.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The tokenizer that produced them; its `all_special_ids` are the special tokens.

    Returns:
        `torch.Tensor`: Boolean tensor of the shape of `input_ids`, `True` on special tokens.
    """
    special = torch.tensor(tokenizer.all_special_ids, dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, special)


def as_list(value: Any) -> list:
    """The sentences of one row's pair column: a packed row, or a row with `align_batch_size` pairs, holds a list of
    them; any other row one sentence."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def sentence_id(text: str) -> int:
    """A stable 63-bit identity of a sentence (the same in every process, unlike `hash`), for duplicate masking."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def _check_sentence(value: Any, column: str, where: str) -> None:
    if not isinstance(value, str):
        raise ValueError(
            f"Row {where}: column {column!r} holds {value!r} ({type(value).__name__}), but each alignment pair needs "
            "a sentence (a string) on both sides. Fix or drop such rows first, e.g. "
            f"`dataset.filter(lambda row: isinstance(row[{column!r}], str) and row[{column!r}].strip())`."
        )
    if not value.strip():
        raise ValueError(
            f"Row {where}: column {column!r} holds an empty or whitespace-only sentence ({value!r}); it cannot be "
            "aligned with its translation. Drop such rows first, e.g. "
            f"`dataset.filter(lambda row: row[{column!r}].strip() != '')`."
        )


def stream_head(dataset: IterableDataset) -> list[dict[str, Any]]:
    """The first `STREAM_CHECK_ROWS` rows of a streamed set: what is checked of it before training."""
    return list(dataset.take(STREAM_CHECK_ROWS))


def dataset_columns(dataset: Dataset | IterableDataset) -> list[str]:
    """
    The columns of a dataset. A stream built from a generator does not know its columns (`column_names` is `None`):
    they are read from its first row.
    """
    columns = dataset.column_names
    if columns is None and isinstance(dataset, IterableDataset):
        head = list(dataset.take(1))
        columns = list(head[0]) if head else []
    return list(columns or [])


def check_dataset_kind(dataset: Any, name: str, allow_dict: bool = False) -> None:
    """
    Refuse containers that are not a `datasets.Dataset` or `IterableDataset` (with `allow_dict`, a plain dict of
    them: named evaluation sets), naming the conversion. A `DatasetDict` is a dict of splits: name the split.
    """
    if dataset is None or isinstance(dataset, (Dataset, IterableDataset)):
        return
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        splits = list(dataset)
        several = " For several named evaluation sets, pass a plain dict {name: dataset}." if allow_dict else ""
        raise TypeError(
            f"The {name} is a {type(dataset).__name__} of the splits {splits}, not one dataset: pass one split, such "
            f"as `dataset[{splits[0]!r}]`.{several}"
        )
    if allow_dict and isinstance(dataset, dict):
        for key, value in dataset.items():
            check_dataset_kind(value, f"{name} {key!r}")
        return
    kind = type(dataset).__name__
    conversions = {"DataFrame": "Dataset.from_pandas(frame)", "list": "Dataset.from_list(rows)"}
    conversion = conversions.get(kind, "Dataset.from_dict({column: values}) or datasets.load_dataset(...)")
    raise TypeError(
        f"The {name} must be a datasets.Dataset or IterableDataset, got {kind}; convert it with `{conversion}`."
    )


def check_pairs(
    dataset_or_rows: Dataset | IterableDataset | list[dict[str, Any]],
    source_column: str,
    target_column: str,
    name: str,
    *,
    fix: str | None = None,
) -> None:
    """
    The one policy for bad alignment pairs: raise a `ValueError` naming the data, the row, the column and the fix when
    a pair column is missing or a pair holds anything but a non-empty sentence on each side. Nothing is dropped.

    Args:
        dataset_or_rows ([`~datasets.Dataset`], [`~datasets.IterableDataset`] or `list[dict]`):
            The pairs. Of an `IterableDataset`, the first `STREAM_CHECK_ROWS` rows are read and checked (see
            [`stream_head`]; errors name the row counted from the start of the stream), the rest batch by batch by the
            collator. A packed row's column holds a list of sentences.
        source_column (`str`):
            Column of the non-English sentences.
        target_column (`str`):
            Column of the English sentences.
        name (`str`):
            How the errors name the data, such as `"train dataset"`, `"batch"` or `"file pairs.jsonl"`.
        fix (`str`, *optional*):
            The advice given when a column is missing, with `{source}` and `{target}` standing for the column names.
            Defaults to the trainer's options (`alignment_dataset=`, `align_source_column`, `align_target_column`).

    Example:

    ```python
    >>> check_pairs([{"src": "Danke", "tgt": " "}], "src", "tgt", "batch")
    Traceback (most recent call last):
    ...
    ValueError: Row 0 of the batch: column 'tgt' holds an empty or whitespace-only sentence (' '); ...
    ```
    """
    if isinstance(dataset_or_rows, IterableDataset):
        columns = dataset_columns(dataset_or_rows)
        dataset_or_rows, name = stream_head(dataset_or_rows), f"{name} stream"
    elif isinstance(dataset_or_rows, list):
        columns = sorted(dataset_or_rows[0]) if dataset_or_rows else []
    else:
        columns = dataset_or_rows.column_names
    is_rows = isinstance(dataset_or_rows, list)
    for column in (source_column, target_column):
        missing = any(column not in row for row in dataset_or_rows) if is_rows else column not in columns
        if missing:
            advice = (fix or _MISSING_COLUMN_FIX).format(source=source_column, target=target_column)
            raise ValueError(
                f"The {name} has no column {column!r} for the alignment pairs (its columns: {columns}). {advice}"
            )
    for column in (source_column, target_column):
        values = [row[column] for row in dataset_or_rows] if is_rows else dataset_or_rows[column]
        for row, value in enumerate(values):
            if isinstance(value, (list, tuple)):  # a packed row
                for item, text in enumerate(value):
                    _check_sentence(text, column, f"{row} of the {name} (its pair {item})")
            else:
                _check_sentence(value, column, f"{row} of the {name}")


def check_identical_sides(sources: list[str], targets: list[str], source_column: str, target_column: str, what: str):
    """
    Pairs whose two sides are the same text (the same column twice, an untranslated copy) teach nothing: a sentence
    retrieves itself at no cost. Refused when at least `IDENTICAL_PAIRS_REFUSED` of the pairs are, warned about above
    `IDENTICAL_PAIRS_WARNED`. `what` names the pairs in the message, such as `"The train dataset's 12 alignment
    pairs"`.
    """
    identical = [i for i, (a, b) in enumerate(zip(sources, targets)) if a.strip() == b.strip()]
    share = len(identical) / max(1, len(sources))
    if not identical or share < IDENTICAL_PAIRS_WARNED:
        return
    message = (
        f"{what}: {len(identical)} of {len(sources)} ({share:.0%}) have the same text in {source_column!r} and "
        f"{target_column!r} (for example pair {identical[0]}: {sources[identical[0]]!r}). A sentence retrieves itself "
        "at no cost, so such pairs align nothing; usually the two columns name the same side, or the 'translations' "
        "were copied untranslated."
    )
    if share >= IDENTICAL_PAIRS_REFUSED:
        raise ValueError(
            f"{message} Point the source column at the non-English sentences and the target column at their English "
            "translations (align_source_column / align_target_column, --source_column / --target_column), or drop "
            f"the copies, e.g. `dataset.filter(lambda row: row[{source_column!r}].strip() != "
            f"row[{target_column!r}].strip())`."
        )
    logger.warning(f"{message} Drop them (`dataset.filter(...)`) unless they are meant to be there.")


def check_distinct_pairs(
    dataset: Dataset | IterableDataset, args: "AlignmentConfig", name: str, batch_size: int, warn: bool = True
) -> None:
    """
    The one policy for pairs that cannot teach anything. Two pairs that share a sentence are duplicates, not used as
    negatives of each other, so a batch has a negative only where two pairs differ on both sides, which some pairs of
    the dataset do exactly when it holds at least 2 distinct sources and at least 2 distinct targets: fewer are
    refused. A pair whose two sides are the same text (the same column twice, an untranslated copy) is matched by
    any model at no cost: pairs refused when at least `IDENTICAL_PAIRS_REFUSED` of them are, warned about above
    `IDENTICAL_PAIRS_WARNED`. With `warn`, also warn when there are fewer distinct sentences than pairs in a batch. Of
    an `IterableDataset`, its first `STREAM_CHECK_ROWS` rows are counted (the rest batch by batch while training).
    """
    source, target = args.align_source_column, args.align_target_column
    if isinstance(dataset, IterableDataset):
        rows = stream_head(dataset)
        if not rows or source not in rows[0] or target not in rows[0]:
            return  # checked by check_pairs / check_eval_dataset
        source_values, target_values = [row[source] for row in rows], [row[target] for row in rows]
        whole = len(rows) < STREAM_CHECK_ROWS
        what = (
            f"The {name} stream's {len(rows)} alignment pairs"
            if whole
            else (f"The first {len(rows)} alignment pairs of the {name} stream")
        )
    else:
        source_values, target_values = dataset[source], dataset[target]
        what = f"The {name} dataset's {len(dataset)} alignment pairs"
    sources = [text for value in source_values for text in as_list(value)]
    targets = [text for value in target_values for text in as_list(value)]
    num_sources, num_targets = len(set(sources)), len(set(targets))
    if min(num_sources, num_targets) < 2:
        side, count, column = ("source", num_sources, source) if num_sources < 2 else ("target", num_targets, target)
        raise ValueError(
            f"{what} hold only {count} distinct {side} sentence "
            f"(column {column!r}; {num_sources} distinct sources, {num_targets} distinct targets). Pairs that share a "
            "sentence are duplicates, which are not used as negatives of each other, so every batch would be left "
            "without a negative and align_loss would be exactly 0.0: nothing would be aligned. Give the pairs at "
            "least 2 (better: many) different sentences on each side."
        )
    check_identical_sides(sources, targets, source, target, what)
    if warn and min(num_sources, num_targets) < batch_size:
        logger.warning(
            f"{what} hold only {num_sources} distinct sources and {num_targets} distinct "
            f"targets, fewer than the {batch_size} pairs of a batch: every batch repeats sentences, repeated pairs are "
            "masked as duplicates, and a batch made of one repeated pair has no negative at all (align_loss 0.0; "
            "counted as align_steps_without_negatives in the logs). Use more distinct pairs."
        )


def attach_alignment_dataset(
    train_dataset: Dataset | IterableDataset | None, alignment_dataset: Dataset | None, args: "AlignmentConfig"
) -> Dataset | IterableDataset | None:
    """
    Check the training data and return the rows the trainer trains on, each with its pair (or, with
    `args.align_batch_size`, its `align_batch_size // per_device_train_batch_size` pairs as lists).

    Without `alignment_dataset`, the training rows must carry the pairs themselves. With it, its pairs are checked,
    shuffled with `args.seed` and attached to the training rows in turn (cycled when there are fewer pairs than rows);
    without training rows (`align_schedule="alignment_only"` only), the shuffled pairs are the training data.
    """
    source, target = args.align_source_column, args.align_target_column
    per_row = (args.align_batch_size or args.per_device_train_batch_size) // args.per_device_train_batch_size
    if isinstance(train_dataset, Dataset) and len(train_dataset) == 0:
        raise ValueError("The train dataset is empty (0 rows); pass a dataset with training rows.")
    if alignment_dataset is None:
        if train_dataset is None:
            return None
        if isinstance(train_dataset, IterableDataset) and not stream_head(train_dataset):
            raise ValueError("The train dataset stream yields no rows; pass a dataset with training rows.")
        check_pairs(train_dataset, source, target, "train dataset")
        if isinstance(train_dataset, IterableDataset):
            check_distinct_pairs(train_dataset, args, "train", args.per_device_train_batch_size)
        if per_row == 1:
            return train_dataset
        # the rows' own pairs, dealt out again several to a row
        row_pairs = train_dataset.select_columns([source, target])
        return _attach_pairs(train_dataset.remove_columns([source, target]), row_pairs, per_row, args)
    if not isinstance(alignment_dataset, Dataset):
        raise TypeError(
            f"`alignment_dataset` must be a datasets.Dataset, got {type(alignment_dataset).__name__}; load it with "
            "`datasets.load_dataset(...)` or `Dataset.from_list(...)`."
        )
    check_pairs(alignment_dataset, source, target, "alignment dataset")
    if len(alignment_dataset) < 2:
        raise ValueError(
            f"`alignment_dataset` has {len(alignment_dataset)} pair(s); the contrastive loss needs at least 2."
        )
    check_distinct_pairs(alignment_dataset, args, "alignment", args.per_device_train_batch_size)
    pairs = alignment_dataset.select_columns([source, target]).shuffle(seed=args.seed)
    if train_dataset is None and args.align_schedule == "alignment_only":
        return pairs if per_row == 1 else _attach_pairs(None, pairs, per_row, args)
    if not isinstance(train_dataset, Dataset):
        raise TypeError(
            "`alignment_dataset` is attached row by row to the training rows, which needs a map-style "
            f"`train_dataset` (datasets.Dataset), got {type(train_dataset).__name__}. Put the pairs in the training "
            "rows instead."
        )
    clash = [c for c in (source, target) if c in train_dataset.column_names]
    if clash:
        raise ValueError(
            f"The train dataset already has the pair column {clash[0]!r} and an `alignment_dataset` was passed too; "
            "keep the pairs in one place (drop the columns or the alignment_dataset)."
        )
    if len(pairs) > per_row * len(train_dataset):
        logger.warning(
            f"alignment_dataset has {len(pairs)} pairs but the train dataset only {len(train_dataset)} rows: each "
            f"epoch uses the same {per_row * len(train_dataset)} pairs; the rest are never seen."
        )
    if per_row > 1:
        return _attach_pairs(train_dataset, pairs, per_row, args)
    cycled = pairs.select([i % len(pairs) for i in range(len(train_dataset))])
    return concatenate_datasets([train_dataset, cycled], axis=1)


def _attach_pairs(
    rows: Dataset | IterableDataset | None, pairs: Dataset, per_row: int, args: "AlignmentConfig"
) -> Dataset:
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


def check_eval_dataset(dataset: Dataset | IterableDataset, args: "AlignmentConfig", name: str) -> bool:
    """Check an evaluation set before evaluating it; return whether it carries alignment pairs."""
    source, target = args.align_source_column, args.align_target_column
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"The {name} dataset is empty (0 rows); pass an evaluation set with rows, or none.")
    columns = dataset_columns(dataset)
    present = [column for column in (source, target) if column in columns]
    if len(present) == 1:
        missing = target if present[0] == source else source
        raise ValueError(
            f"The {name} dataset has the pair column {present[0]!r} but not {missing!r} (its columns: {columns}). Give "
            "it both sides of each pair, drop the column to evaluate the task loss only, or point "
            "align_source_column / align_target_column at your columns."
        )
    if present:
        check_pairs(dataset, source, target, f"{name} dataset")
        check_distinct_pairs(dataset, args, name, args.per_device_eval_batch_size)
        if args.per_device_eval_batch_size < 2:
            raise ValueError(
                f"per_device_eval_batch_size={args.per_device_eval_batch_size}: evaluating the alignment loss "
                "needs at least 2 pairs per batch. Raise it to 2 or more."
            )
        return True
    if args.align_schedule == "alignment_only":
        raise ValueError(
            f"align_schedule='alignment_only' evaluates the alignment loss, but the {name} dataset has no "
            f"{source!r}/{target!r} columns. Give it pairs or drop it."
        )
    logger.warning(
        f"The {name} dataset has no alignment pairs (no {source!r}/{target!r} columns): only the task loss is "
        "evaluated on it (its eval loss and task_loss), without align_loss."
    )
    return False


def all_rows_dropped_message(args: "AlignmentConfig", name: str, given_rows: int | None) -> str:
    """The error for a dataset of which TRL's preparation dropped every row."""
    given = f"All {given_rows} rows" if given_rows else "All rows"
    return (
        f"{given} of the {name} dataset were dropped by TRL's dataset preparation, which drops the rows that "
        f"truncation to max_length={args.max_length} tokens (truncation_mode={args.truncation_mode!r}) leaves "
        "without a token to compute the loss on (with completion_only_loss, a prompt that alone fills max_length "
        "leaves nothing of the completion). Raise max_length (or set it to None), use truncation_mode='keep_end', "
        "or shorten the prompts."
    )


def named_datasets(
    dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None,
) -> dict[str, Dataset | IterableDataset]:
    """An evaluation set as a dict of named sets, as `Trainer` names them: a single set is `"eval"`."""
    datasets = dataset if isinstance(dataset, dict) else {"eval": dataset}
    return {name: value for name, value in datasets.items() if value is not None}


def check_prepared_dataset(
    dataset: Dataset | IterableDataset | None,
    args: "AlignmentConfig",
    name: str,
    given_rows: int | None,
    warn: bool = True,
) -> None:
    """
    Check the training rows as TRL's preparation left them (it may drop rows that truncation leaves without a token
    to train on; `given_rows` were given): not empty, no trailing batch of one pair, at least 2 distinct pairs (with
    `warn`, a warning for fewer distinct pairs than a batch holds). An `IterableDataset` has no length: its batches
    are checked as they come.
    """
    if not isinstance(dataset, Dataset):
        return
    batch_size = args.per_device_train_batch_size
    rows = len(dataset)
    if rows == 0:
        raise ValueError(all_rows_dropped_message(args, name, given_rows))
    dropped = (given_rows or rows) - rows
    note = (
        f" ({dropped} of the {given_rows} rows given were dropped by TRL's preparation: truncation to "
        f"max_length={args.max_length} left them without a token to train on)"
        if dropped > 0
        else ""
    )
    # A packed row carries the pairs of all its rows: a batch of one packed row may still hold several pairs
    fewest_pairs = min(len(as_list(value)) for value in dataset[args.align_source_column])
    if rows < 2 and fewest_pairs < 2:
        raise ValueError(
            f"The {name} dataset has {rows} row{note}, but the contrastive alignment loss needs at least 2 pairs "
            "per batch. Give it more rows."
        )
    if args.dataloader_drop_last and rows < batch_size * args.world_size:
        raise ValueError(
            f"The {name} dataset has {rows} rows{note}, fewer than one batch of per_device_train_batch_size="
            f"{batch_size} on each of {args.world_size} process(es), and dataloader_drop_last=True drops that "
            "partial batch: nothing would be trained. Lower the batch size or set dataloader_drop_last=False."
        )
    if not args.dataloader_drop_last and args.world_size == 1 and rows % batch_size == 1 and fewest_pairs < 2:
        raise ValueError(
            f"With {rows} rows{note} and per_device_train_batch_size={batch_size}, the last batch of each epoch "
            "holds a single pair, which has no negative for the contrastive loss. Set dataloader_drop_last=True or "
            "change the batch size."
        )
    check_distinct_pairs(dataset, args, name, batch_size, warn=warn)


def has_pair_columns(dataset: Dataset | IterableDataset, args: "AlignmentConfig") -> bool:
    """Whether `dataset` has both pair columns."""
    columns = dataset_columns(dataset)
    return args.align_source_column in columns and args.align_target_column in columns


def pack_with_pairs(
    dataset: Dataset,
    args: "AlignmentConfig",
    dataset_name: str,
    prepare: Callable[[Dataset, "AlignmentConfig"], Dataset],
) -> Dataset:
    """
    Pack `dataset` as TRL does while keeping its alignment pairs. TRL packs only `input_ids` and `labels`, so the rows
    are prepared unpacked with `prepare(rows, args)` (TRL's preparation with packing off), then packed with TRL's
    `pack_dataset` (same order, same strategy) while each row's index travels with its first token. Each packed row
    then carries, as lists, the pairs of the rows that start in it; a packed row in which no row starts (only with
    `packing_strategy="wrapped"`) gets a pair in turn from all pairs. An epoch therefore uses every row's pair once.
    """
    source, target = args.align_source_column, args.align_target_column
    if not isinstance(dataset, Dataset):
        raise ValueError(
            f"packing=True with alignment pairs needs a map-style {dataset_name} dataset (datasets.Dataset), got "
            f"{type(dataset).__name__}: the pairs of the rows packed together are found by row index. Load the "
            "dataset without streaming, or set packing=False."
        )
    if args.max_length is None:
        raise ValueError("When packing is enabled, `max_length` can't be `None`.")  # TRL's own check, kept
    sources, targets = dataset[source], dataset[target]
    # Tokenized and labelled as TRL does; TRL skips truncation when packing, so pass max_length=None here
    unpacked_args = copy.copy(args)
    unpacked_args.max_length = None
    unpacked_args.shuffle_dataset = False
    rows = prepare(dataset.add_column(_ROW_COLUMN, list(range(len(dataset)))), unpacked_args)
    rows = rows.map(
        lambda row: {_ROW_COLUMN: [row[_ROW_COLUMN]] + [-1] * (len(row["input_ids"]) - 1)},
        desc=f"Marking the rows of the {dataset_name} dataset",
    ).select_columns(["input_ids", "labels", _ROW_COLUMN])
    if args.shuffle_dataset:  # the steps of TRL's packing, in its order
        rows = rows.shuffle(seed=args.seed)
    packed = pack_dataset(rows, args.max_length, args.packing_strategy, {"desc": f"Packing {dataset_name} dataset"})
    starts = [[index for index in marks if index >= 0] for marks in packed[_ROW_COLUMN]]
    spare = 0
    for carried in starts:
        if not carried:  # no row starts here (wrapped packing): reuse pairs in turn
            carried.append(spare % len(sources))
            spare += 1
    packed = packed.remove_columns(_ROW_COLUMN)
    packed = packed.add_column(source, [[sources[i] for i in carried] for carried in starts])
    packed = packed.add_column(target, [[targets[i] for i in carried] for carried in starts])
    if args.shuffle_dataset:
        packed = packed.shuffle(seed=args.seed)
    logger.info(
        f"Packed {len(sources)} rows of the {dataset_name} dataset into {len(packed)} sequences; each carries "
        f"the pairs of the rows packed into it ({len(sources) + spare} pairs per epoch, "
        f"{(len(sources) + spare) / max(1, len(packed)):.1f} per packed sequence on average)."
    )
    return packed


def check_batch_for_schedule(
    args: "AlignmentConfig", *, needs_task: bool, needs_pairs: bool, has_task: bool, has_pairs: bool, mode: str
) -> None:
    """
    Refuse a batch that lacks what the schedule asks of it (task rows, alignment pairs), naming the columns or the
    argument that would give them.
    """
    schedule = args.align_schedule
    columns = f"{args.align_source_column!r} and {args.align_target_column!r}"
    if mode == "eval" and not needs_task and not has_pairs:
        raise ValueError(
            f"This evaluation batch holds no alignment pairs, and align_schedule={schedule!r} evaluates only the "
            f"alignment loss. Give the evaluation rows the columns {columns}."
        )
    if needs_pairs and not has_pairs:
        raise ValueError(
            f"This batch carries no alignment pairs. Give the rows the columns {columns}, or pass `alignment_dataset`."
        )
    if needs_task and not has_task:
        raise ValueError(
            f"align_schedule={schedule!r} needs task examples, but the batch only holds alignment pairs. Pass task "
            "rows as `train_dataset`, or use align_schedule='alignment_only'."
        )


@dataclass
class DataCollatorForAlignment(DataCollatorMixin):
    """
    Data collator that adds the padded parallel sentences of each row to the batch built by TRL's SFT collator.

    Each example holds a task example (what TRL's collator reads, such as `input_ids` and `labels`) and a parallel
    pair in `source_column` (the non-English sentence) and `target_column` (its English translation), as raw text; a
    packed row holds lists of sentences (the pairs of the rows packed into it), which all join the batch.
    The sentences are tokenized as they are (no chat template, the tokenizer's own special tokens, such as Llama's
    BOS), truncated to `max_length`, and both sides are right-padded with TRL's `pad` to one common length so that the
    model can run them in a single batched forward. Examples without `input_ids` (pairs only, for
    `align_schedule="alignment_only"`) produce a batch with the pair keys only.

    The returned batch holds the keys of `task_collator` and:
    - `"align_input_ids"`: `(2 * batch, seq)` token ids, the source sentences first, then the targets.
    - `"align_attention_mask"`: `(2 * batch, seq)` attention mask.
    - `"align_special_tokens_mask"`: `(2 * batch, seq)` boolean, `True` on special tokens (for
      `align_pooling="mean_no_special"`).
    - `"align_same_pair"`: `(batch, batch)` boolean, `True` at `[i, j]` when pairs `i` and `j` share their source or
      their target sentence, so that duplicates are not used as negatives of each other.
    - `"align_pair_ids"`: `(batch, 2)` int64, a stable hash of each pair's source and target sentence, from which the
      duplicate mask is built across processes when negatives are gathered (`align_gather_negatives`).

    A pair column may also hold a list of sentences per example (a packed row, or several pairs attached to one row by
    `align_batch_size`): the lists are flattened, so `batch` above counts pairs, not examples.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Tokenizer for the parallel sentences; its `pad_token_id` pads them.
        task_collator (`Callable`, *optional*):
            Collator for the task part of the examples, usually TRL's
            [`~trl.trainer.sft_trainer.DataCollatorForLanguageModeling`]. When `None`, only pairs are collated.
        source_column (`str`, *optional*, defaults to `"parallel_source"`):
            Column of the non-English sentences.
        target_column (`str`, *optional*, defaults to `"parallel_target"`):
            Column of the English sentences.
        max_length (`int`, *optional*, defaults to `256`):
            Maximum number of tokens per sentence; longer sentences are truncated, with one warning.
        return_tensors (`str`, *optional*, defaults to `"pt"`):
            Only `"pt"` is supported.
        require_pairs (`bool`, *optional*, defaults to `True`):
            Whether every batch must carry both pair columns (training). With `False` (the trainer's evaluation
            collator), a batch of task examples without either pair column gets the task keys only, so that an
            evaluation set without pairs is evaluated on the task loss alone; a batch with only one of the two
            columns is still refused.

    Example:

    ```python
    >>> from transformers import AutoTokenizer
    >>> from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    >>> tokenizer = AutoTokenizer.from_pretrained("gpt2")  # any tokenizer with a pad token
    >>> tokenizer.pad_token = tokenizer.eos_token
    >>> collator = DataCollatorForAlignment(tokenizer, DataCollatorForLanguageModeling(tokenizer.pad_token_id))
    >>> batch = collator(
    ...     [
    ...         {"input_ids": [1, 2], "parallel_source": "Hallo Welt", "parallel_target": "Hello world"},
    ...         {"input_ids": [3], "parallel_source": "Danke", "parallel_target": "Thanks"},
    ...     ]
    ... )
    >>> sorted(key for key in batch if key.startswith("align_"))  # doctest: +NORMALIZE_WHITESPACE
    ['align_attention_mask', 'align_input_ids', 'align_pair_ids', 'align_same_pair',
     'align_special_tokens_mask']
    >>> batch["align_input_ids"].shape[0]  # two sources, then two targets
    4
    ```
    """

    tokenizer: PreTrainedTokenizerBase
    task_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    source_column: str = "parallel_source"
    target_column: str = "parallel_target"
    max_length: int | None = 256
    return_tensors: str = "pt"
    require_pairs: bool = True
    _warned_truncation: bool = field(default=False, init=False, repr=False)

    def _encode(self, texts: list[str]) -> list[torch.Tensor]:
        encoded = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        if self.max_length is not None and any(len(ids) > self.max_length for ids in encoded):
            if not self._warned_truncation:
                longest = max(len(ids) for ids in encoded)
                logger.warning(
                    f"Parallel sentences longer than align_max_length={self.max_length} tokens are truncated (saw "
                    f"{longest} tokens). Raise align_max_length to keep whole sentences. (Said once.)"
                )
                self._warned_truncation = True
            encoded = [ids[: self.max_length] for ids in encoded]
        return [torch.tensor(ids, dtype=torch.long) for ids in encoded]

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        pair_columns = (self.source_column, self.target_column)
        batch = {}
        if self.task_collator is not None and "input_ids" in examples[0]:
            batch = self.task_collator([{k: v for k, v in ex.items() if k not in pair_columns} for ex in examples])
        if not self.require_pairs and "input_ids" in batch and not any(c in examples[0] for c in pair_columns):
            return batch  # an evaluation set without pairs: task loss only
        check_pairs(examples, self.source_column, self.target_column, "batch")
        if self.tokenizer.pad_token_id is None:
            raise ValueError(
                "The tokenizer has no pad token; set `tokenizer.pad_token` (for example to its EOS token)."
            )

        # A packed row, or a row with align_batch_size pairs, carries several pairs as lists: they all join the batch
        sources = [text for ex in examples for text in as_list(ex[self.source_column])]
        targets = [text for ex in examples for text in as_list(ex[self.target_column])]
        for row, ex in enumerate(examples):
            n_sources, n_targets = len(as_list(ex[self.source_column])), len(as_list(ex[self.target_column]))
            if n_sources != n_targets:
                raise ValueError(
                    f"Row {row} of the batch holds {n_sources} sentences in {self.source_column!r} but {n_targets} "
                    f"in {self.target_column!r}; a row with several pairs needs one translation per sentence, in the "
                    "same order."
                )
        encoded = self._encode(sources) + self._encode(targets)  # sources first, then targets
        input_ids = pad(encoded, padding_value=self.tokenizer.pad_token_id)  # (2 * batch, seq)
        batch["align_input_ids"] = input_ids
        batch["align_attention_mask"] = pad([torch.ones_like(ids) for ids in encoded], padding_value=0)
        batch["align_special_tokens_mask"] = special_tokens_mask(input_ids, self.tokenizer)
        same_source = torch.tensor([[a == b for b in sources] for a in sources], dtype=torch.bool)
        same_target = torch.tensor([[a == b for b in targets] for a in targets], dtype=torch.bool)
        batch["align_same_pair"] = same_source | same_target  # (batch, batch)
        batch["align_pair_ids"] = torch.tensor(
            [[sentence_id(a), sentence_id(b)] for a, b in zip(sources, targets)], dtype=torch.long
        )  # (batch, 2)
        return batch
