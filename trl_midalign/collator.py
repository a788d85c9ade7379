import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.data.data_collator import DataCollatorMixin


logger = logging.getLogger(__name__)

PAIR_KEYS = (
    "align_input_ids",
    "align_attention_mask",
    "align_pool_mask",
    "align_same_pair",
    "align_pair_ids",
)


def _as_list(value: Any) -> list:
    """A row's pair column holds one sentence, or a list of sentences (several pairs attached to one row)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def sentence_id(text: str) -> int:
    """A stable 63-bit identity of a sentence (the same in every process, unlike `hash`), for duplicate masking."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def check_sentence(value: Any, column: str, row: int | str) -> None:
    """Raise a `ValueError` naming the row and column when `value` is not a non-empty sentence."""
    if not isinstance(value, str):
        raise ValueError(
            f"Row {row}: column {column!r} holds {value!r} ({type(value).__name__}), but each alignment pair needs a "
            "sentence (a string) on both sides. Fix or drop such rows before training, e.g. "
            f"`dataset.filter(lambda row: isinstance(row[{column!r}], str) and row[{column!r}].strip())`."
        )
    if not value.strip():
        raise ValueError(
            f"Row {row}: column {column!r} holds an empty or whitespace-only sentence ({value!r}); it cannot be "
            "aligned with its translation. Drop such rows before training, e.g. "
            f"`dataset.filter(lambda row: row[{column!r}].strip() != '')`."
        )


@dataclass
class DataCollatorForAlignment(DataCollatorMixin):
    """
    Data collator that adds the padded parallel sentences of each row to the batch built by TRL's SFT collator.

    Each example holds a task example (what TRL's collator reads, such as `input_ids` and `labels`) and a parallel
    pair in `source_column` (the non-English sentence) and `target_column` (its English translation), as raw text; a
    packed row holds lists of sentences (the pairs of the rows packed into it), which all join the batch.
    The sentences are tokenized as they are (no chat template, the tokenizer's own special tokens, such as Llama's
    BOS), truncated to `max_length`, and both sides are right-padded to one common length so that the model can run
    them in a single batched forward. Examples without `input_ids` (pairs only, for `align_schedule="alignment_only"`)
    produce a batch with the pair keys only.

    The returned batch holds the keys of `task_collator` and:
    - `"align_input_ids"`: `(2 * batch, seq)` token ids, the source sentences first, then the targets.
    - `"align_attention_mask"`: `(2 * batch, seq)` attention mask.
    - `"align_pool_mask"`: `(2 * batch, seq)` positions to pool: the attention mask without special tokens (only
      when `pooling="mean_no_special"`).
    - `"align_same_pair"`: `(batch, batch)` boolean, `True` at `[i, j]` when pairs `i` and `j` share their source or
      their target sentence, so that duplicates are not used as negatives of each other.
    - `"align_pair_ids"`: `(batch, 2)` int64, a stable hash of each pair's source and target sentence, from which the
      duplicate mask is built across processes when negatives are gathered (`align_gather_negatives`).

    A pair column may also hold a list of sentences per example (several pairs attached to one row, see
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
        pooling (`str`, *optional*, defaults to `"mean"`):
            The trainer's `align_pooling`; `"mean_no_special"` adds `"align_pool_mask"`.
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
    >>> sorted(batch)  # doctest: +NORMALIZE_WHITESPACE
    ['align_attention_mask', 'align_input_ids', 'align_pair_ids', 'align_same_pair',
     'attention_mask', 'input_ids', 'labels']
    >>> batch["align_input_ids"].shape[0]  # two sources, then two targets
    4
    ```
    """

    tokenizer: PreTrainedTokenizerBase
    task_collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    source_column: str = "parallel_source"
    target_column: str = "parallel_target"
    max_length: int | None = 256
    pooling: str = "mean"
    return_tensors: str = "pt"
    require_pairs: bool = True
    _warned_truncation: bool = field(default=False, init=False, repr=False)

    def _encode(self, texts: list[str]) -> list[list[int]]:
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
        return encoded

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        pair_columns = (self.source_column, self.target_column)
        batch = {}
        if self.task_collator is not None and "input_ids" in examples[0]:
            batch = self.task_collator([{k: v for k, v in ex.items() if k not in pair_columns} for ex in examples])

        missing = [column for column in pair_columns if column not in examples[0]]
        if len(missing) == len(pair_columns) and not self.require_pairs and "input_ids" in batch:
            return batch  # an evaluation set without pairs: task loss only
        if missing:
            raise ValueError(
                f"The batch has no column {missing[0]!r} for the alignment pairs (it has {sorted(examples[0])}). Add "
                "the column, pass an `alignment_dataset`, or name your columns with align_source_column / "
                "align_target_column."
            )
        # A packed row, or a row with align_batch_size pairs, carries several pairs as lists: they all join the batch
        sources = [text for ex in examples for text in _as_list(ex[self.source_column])]
        targets = [text for ex in examples for text in _as_list(ex[self.target_column])]
        for row, ex in enumerate(examples):
            if len(_as_list(ex[self.source_column])) != len(_as_list(ex[self.target_column])):
                raise ValueError(
                    f"Row {row} of the batch holds {len(_as_list(ex[self.source_column]))} sentences in "
                    f"{self.source_column!r} but {len(_as_list(ex[self.target_column]))} in {self.target_column!r}; "
                    "a row with several pairs needs one translation per sentence, in the same order."
                )
        for column, texts in zip(pair_columns, (sources, targets)):
            for row, text in enumerate(texts):
                check_sentence(text, column, f"{row} of the batch")

        encoded = self._encode(sources) + self._encode(targets)  # sources first, then targets
        length = max(len(ids) for ids in encoded)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError(
                "The tokenizer has no pad token; set `tokenizer.pad_token` (for example to its EOS token)."
            )
        input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        batch["align_input_ids"] = input_ids
        batch["align_attention_mask"] = attention_mask
        if self.pooling == "mean_no_special":
            special = torch.tensor(self.tokenizer.all_special_ids, dtype=torch.long)
            batch["align_pool_mask"] = attention_mask * ~torch.isin(input_ids, special)

        same_source = torch.tensor([[a == b for b in sources] for a in sources], dtype=torch.bool)
        same_target = torch.tensor([[a == b for b in targets] for a in targets], dtype=torch.bool)
        batch["align_same_pair"] = same_source | same_target  # (batch, batch)
        batch["align_pair_ids"] = torch.tensor(
            [[sentence_id(a), sentence_id(b)] for a, b in zip(sources, targets)], dtype=torch.long
        )  # (batch, 2)
        return batch
