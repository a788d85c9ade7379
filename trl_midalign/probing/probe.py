"""Per-layer cross-lingual alignment probing (the analysis of Liu & Niehues, 2025, Section 3).

For every layer of a causal LM (0 = embedding output .. N = last block, transformers' `hidden_states`
convention), parallel sentences are pooled (as the alignment loss pools them, see [`~trl_midalign.losses.pool`])
and compared by cosine similarity: how often is the nearest sentence on the other side the true translation
(retrieval accuracy), and how much more similar are true pairs than non-pairs (similarity gap). Parallel sentences
are most similar in the middle layers, which is where [`AlignmentTrainer`] adds its alignment loss.
"""

import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from trl.trainer.utils import pad

from ..data import check_pairs, special_tokens_mask
from ..layers import get_decoder
from ..losses import POOLINGS, PoolingMode, pool


MEAN = "mean"  # the key of the average over languages in every score dictionary
_ALL_PAIRS = "all"  # the group of pairs without a language column
_JSON_FORMAT_VERSION = 1
_METRICS = ("retrieval_accuracy", "source_to_target_accuracy", "target_to_source_accuracy", "similarity_gap")
_COLUMN_FIX = (
    "Rename the column, or pass source_column= / target_column= (CLI: --source_column / --target_column) naming "
    "the columns with the non-English sentence ({source!r}) and its translation ({target!r})."
)


@dataclass
class ProbeResult:
    r"""
    Per-layer, per-language alignment scores returned by [`probe_layers`].

    Every score dictionary maps each language, and `"mean"` (the unweighted average over the languages), to a list
    with one value per entry of `layers`.

    Args:
        layers (`list[int]`):
            Layer indices, `0` (embedding output) to `N` (output of the last block, after the final norm as in
            transformers' `hidden_states[N]`).
        languages (`list[str]`):
            Languages that were probed (at least 2 pairs each).
        retrieval_accuracy (`dict[str, list[float]]`):
            Mean of the two directional retrieval accuracies below.
        source_to_target_accuracy (`dict[str, list[float]]`):
            Fraction of source sentences whose nearest target sentence (cosine, within the language's pairs) is
            strictly more similar than every other target and is their translation.
        target_to_source_accuracy (`dict[str, list[float]]`):
            The same with the roles swapped.
        similarity_gap (`dict[str, list[float]]`):
            Mean cosine similarity of the true pairs minus the mean cosine similarity of all non-pairs.
        num_pairs (`dict[str, int]`):
            Number of pairs probed per language.
        model_name (`str` or `None`, *optional*, defaults to `None`):
            Name or path of the probed model.
        recommended_layer (`int` or `None`, *optional*, defaults to `None`):
            Layer to align, see [`recommend_layer`]. Computed from `retrieval_accuracy["mean"]` when not given.
        pooling (`str`, *optional*, defaults to `"mean"`):
            How the sentences' token states were pooled (see [`~trl_midalign.losses.pool`]).
    """

    layers: list[int]
    languages: list[str]
    retrieval_accuracy: dict[str, list[float]]
    source_to_target_accuracy: dict[str, list[float]]
    target_to_source_accuracy: dict[str, list[float]]
    similarity_gap: dict[str, list[float]]
    num_pairs: dict[str, int]
    model_name: str | None = None
    recommended_layer: int | None = None
    pooling: PoolingMode = "mean"

    def __post_init__(self):
        if self.recommended_layer is None:
            self.recommended_layer = recommend_layer(self.retrieval_accuracy[MEAN], self.layers)

    def to_dict(self) -> dict[str, Any]:
        """
        The result as a JSON-serialisable dict, in the stable `probe.json` layout.

        Returns:
            `dict`: Keys `layers`, `languages`, `retrieval_accuracy` (`{language: [one value per layer], ...,
            "mean": [...]}`), `recommended_layer`, `model_name`, `num_pairs`, `pooling`, plus
            `source_to_target_accuracy`, `target_to_source_accuracy`, `similarity_gap` (same layout as
            `retrieval_accuracy`) and `format_version`.
        """
        return {
            "format_version": _JSON_FORMAT_VERSION,
            "model_name": self.model_name,
            "pooling": self.pooling,
            "layers": list(self.layers),
            "languages": list(self.languages),
            "num_pairs": dict(self.num_pairs),
            "recommended_layer": self.recommended_layer,
            **{metric: {k: list(v) for k, v in getattr(self, metric).items()} for metric in _METRICS},
        }

    def to_json(self, path: str | os.PathLike) -> str:
        """
        Write [`~ProbeResult.to_dict`] to `path` (parent directories are created).

        Args:
            path (`str` or `os.PathLike`):
                File to write, conventionally `probe.json`.

        Returns:
            `str`: The path written.
        """
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProbeResult":
        """
        Rebuild a result from [`~ProbeResult.to_dict`] output.

        Args:
            data (`Mapping[str, Any]`):
                A dict in the `probe.json` layout.

        Returns:
            [`ProbeResult`]
        """
        required = ("layers", "languages", "retrieval_accuracy", "num_pairs")
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(f"Not a probe result: the keys {missing} are missing (expected the probe.json layout).")
        empty = {language: [] for language in [*data["languages"], MEAN]}
        return cls(
            layers=[int(layer) for layer in data["layers"]],
            languages=list(data["languages"]),
            **{metric: {k: list(v) for k, v in data.get(metric, empty).items()} for metric in _METRICS},
            num_pairs={k: int(v) for k, v in data["num_pairs"].items()},
            model_name=data.get("model_name"),
            recommended_layer=data.get("recommended_layer"),
            pooling=data.get("pooling", "mean"),
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ProbeResult":
        """
        Read a result written by [`~ProbeResult.to_json`].

        Args:
            path (`str` or `os.PathLike`):
                Path of a `probe.json` file.

        Returns:
            [`ProbeResult`]
        """
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_markdown(self, metric: str = "retrieval_accuracy") -> str:
        """
        A Markdown table with one row per layer and one column per language plus the mean; the recommended layer is
        marked with `*`.

        Args:
            metric (`str`, *optional*, defaults to `"retrieval_accuracy"`):
                `"retrieval_accuracy"`, `"source_to_target_accuracy"`, `"target_to_source_accuracy"` or
                `"similarity_gap"`.

        Returns:
            `str`: The table.
        """
        if metric not in _METRICS:
            raise ValueError(f"Unknown metric {metric!r}; choose one of {list(_METRICS)}.")
        scores = getattr(self, metric)
        columns = [*self.languages, MEAN]
        header = " | ".join(f"{c} (n={self.num_pairs[c]})" if c in self.num_pairs else c for c in columns)
        lines = [f"| layer | {header} |", "|" + "---:|" * (len(columns) + 1)]
        for i, layer in enumerate(self.layers):
            mark = "*" if layer == self.recommended_layer else ""
            values = " | ".join(_format(scores[c][i]) for c in columns)
            lines.append(f"| {layer}{mark} | {values} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def plot(self, output_dir: str | os.PathLike, prefix: str = "probe") -> list[str]:
        """
        Save the heatmap and the per-layer curves as `{output_dir}/{prefix}_heatmap.png` and `{prefix}_curve.png`
        and return their paths: [`~trl_midalign.probing.plots.plot_probe`] (needs matplotlib,
        `pip install "trl-midalign[plot]"`).
        """
        from .plots import plot_probe

        return plot_probe(self, output_dir, prefix)


def _format(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def recommend_layer(mean_retrieval_accuracy: list[float], layers: list[int] | None = None) -> int | None:
    """
    The layer with the highest mean retrieval accuracy, layer 0 excluded, or `None` when the scores cannot tell the
    layers apart: every layer above 0 scores 0 (nothing was retrieved anywhere), or all score the same.

    Layer 0 (the embedding output) is context-free and no block can be trained to change it, so it is never
    recommended. Ties go to the lower layer: the alignment step only runs the blocks below the aligned layer, so a
    lower layer is cheaper, and it leaves more blocks above it free for the task.

    Args:
        mean_retrieval_accuracy (`list[float]`):
            One value per layer (`ProbeResult.retrieval_accuracy["mean"]`).
        layers (`list[int]` or `None`, *optional*, defaults to `None`):
            The layer index of each value; `0 .. len - 1` when `None`.

    Returns:
        `int` or `None`: The recommended layer index, or `None` when no layer is better than another.
    """
    layers = list(range(len(mean_retrieval_accuracy))) if layers is None else list(layers)
    candidates = [(value, layer) for layer, value in zip(layers, mean_retrieval_accuracy) if layer > 0]
    if not candidates:
        raise ValueError("Cannot recommend a layer: the probe has no layer above 0 (the embedding output).")
    values = [value for value, _ in candidates if not math.isnan(value)]
    if not values:
        return None
    best = max(values)
    if best <= 0 or (len(candidates) > 1 and min(values) >= best - 1e-9):
        return None
    return min(layer for value, layer in candidates if value >= best - 1e-9)


def no_recommendation_reason(result: "ProbeResult") -> str:
    """Why `result` recommends no layer, and what to do (for a result whose `recommended_layer` is `None`)."""
    scores = [value for layer, value in zip(result.layers, result.retrieval_accuracy[MEAN]) if layer > 0]
    same = f"{scores[0]:.3f}" if scores else "-"
    return (
        f"No layer can be recommended: every layer above 0 has the same mean retrieval accuracy ({same}), so the "
        "scores cannot tell the layers apart. Usually the sentences were cut to (almost) nothing (raise max_length), "
        f"the pairs are too few or not translations of each other ({sum(result.num_pairs.values())} pairs probed), or "
        "the model is untrained. Fix the data or settings and probe again, or choose align_layer yourself (the "
        "paper: the middle layer, align_layer='middle')."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Grouping the pairs by language
# ---------------------------------------------------------------------------------------------------------------------


def group_pairs(
    pairs,
    *,
    source_column: str = "parallel_source",
    target_column: str = "parallel_target",
    language_column: str = "language",
    languages: list[str] | None = None,
    max_pairs_per_language: int | None = None,
    name: str = "pairs",
) -> dict[str, tuple[list[str], list[str]]]:
    """
    Check the pairs ([`~trl_midalign.data.check_pairs`]: a bad pair is an error) and group them by language:
    `{language: (sources, targets)}` in order of appearance. A pair repeating a sentence of an earlier pair of its
    language is dropped with a warning (retrieval cannot tell identical sentences apart), and so is a language with
    fewer than 2 pairs. `name` is how the errors name the pairs.
    """
    if max_pairs_per_language is not None and max_pairs_per_language < 2:
        raise ValueError(
            f"max_pairs_per_language={max_pairs_per_language}: retrieval needs at least 2 pairs per language; pass "
            "a value >= 2 or None for all pairs."
        )
    if isinstance(pairs, Mapping):
        raise ValueError(
            f"pairs must be a datasets.Dataset or a list of dicts (one pair per row), got a {type(pairs).__name__}. "
            "For a DatasetDict pass one split, for example pairs['train']; for a dict of columns use "
            "datasets.Dataset.from_dict(...)."
        )
    if getattr(pairs, "column_names", None) is None:
        pairs = list(pairs)
        for index, row in enumerate(pairs):
            if not isinstance(row, Mapping):
                raise ValueError(f"pairs[{index}] is a {type(row).__name__}, expected a dict with the pair's columns.")
        has_language = any(language_column in row for row in pairs)
        langs = [row.get(language_column, _ALL_PAIRS) for row in pairs]
    else:
        has_language = language_column in pairs.column_names
        langs = pairs[language_column] if has_language else [_ALL_PAIRS] * len(pairs)
    check_pairs(pairs, source_column, target_column, name, fix=_COLUMN_FIX)
    if isinstance(pairs, list):
        sources, targets = [row[source_column] for row in pairs], [row[target_column] for row in pairs]
    else:
        sources, targets = pairs[source_column], pairs[target_column]
    if languages is not None and not has_language:
        raise ValueError(
            f"languages={list(languages)} was given but the pairs have no {language_column!r} column to select them "
            "by. Name the column with language_column= (CLI: --language_column), or leave languages out to probe all "
            "pairs as one group."
        )

    groups: dict[str, tuple[list[str], list[str]]] = {}
    seen: dict[str, set[tuple[str, str]]] = {}
    duplicates = 0
    for source, target, language in zip(sources, targets, langs):
        language = _ALL_PAIRS if language is None else str(language)
        if language == MEAN:
            raise ValueError(
                f"A language is named {MEAN!r}, which is reserved for the average over languages; rename it."
            )
        language_seen = seen.setdefault(language, set())
        if ("s", source) in language_seen or ("t", target) in language_seen:
            duplicates += 1
            continue
        language_seen.update((("s", source), ("t", target)))
        group = groups.setdefault(language, ([], []))
        group[0].append(source)
        group[1].append(target)
    if duplicates:
        warnings.warn(
            f"Dropped {duplicates} pair(s) that repeat a source or target sentence of an earlier pair of the same "
            "language: retrieval cannot tell identical sentences apart.",
            stacklevel=3,
        )
    if languages is not None:
        unknown = [str(language) for language in languages if str(language) not in groups]
        if unknown:
            raise ValueError(
                f"Unknown language(s) {unknown}: the pairs' {language_column!r} column has {sorted(groups)}. Pass "
                "languages from that list, or None for all."
            )
        groups = {language: groups[language] for language in dict.fromkeys(map(str, languages))}
    limit = max_pairs_per_language
    groups = {language: (sources[:limit], targets[:limit]) for language, (sources, targets) in groups.items()}
    too_small = [f"{language} ({len(sources)})" for language, (sources, _) in groups.items() if len(sources) < 2]
    if too_small:
        warnings.warn(
            f"Skipped language(s) with fewer than 2 pairs, where retrieval is meaningless: {', '.join(too_small)}.",
            stacklevel=3,
        )
    groups = {language: group for language, group in groups.items() if len(group[0]) >= 2}
    if not groups:
        raise ValueError(
            "No language has at least 2 usable pairs to probe. Check the data and the "
            f"{source_column!r} / {target_column!r} / {language_column!r} columns."
        )
    return groups


# ---------------------------------------------------------------------------------------------------------------------
# Encoding and scoring
# ---------------------------------------------------------------------------------------------------------------------


def _model_name(model: nn.Module) -> str | None:
    config = getattr(get_decoder(model), "config", None)
    return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None


def pad_token_id(tokenizer) -> int:
    """
    The id that pads a batch of `tokenizer`'s sequences: its pad token, else its EOS token (which many causal LMs pad
    with). The padded positions are masked, so the choice changes no result; probing and evaluation share it.

    Raises:
        ValueError: If the tokenizer has neither a pad nor an EOS token.
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token.")
    return tokenizer.eos_token_id


@torch.no_grad()
def _encode(
    model: nn.Module,
    tokenizer,
    sentences: list[str],
    *,
    batch_size: int,
    max_length: int,
    pooling: PoolingMode,
    show_progress: bool | None,
) -> torch.Tensor:
    """Pooled states of every sentence at every layer: float32 tensor (num_layers + 1, num_sentences, hidden)."""
    from tqdm.auto import tqdm

    decoder = get_decoder(model)
    device = next(decoder.parameters(), torch.empty(0)).device
    encoded = tokenizer(sentences, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    pad_id = pad_token_id(tokenizer)
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory error shows up at once.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if show_progress is None:
        show_progress = len(batches) > 8
    pooled: torch.Tensor | None = None
    for batch in tqdm(batches, desc="Probing layers", unit="batch", disable=not show_progress):
        input_ids = pad([torch.tensor(encoded[i]) for i in batch], padding_value=pad_id).to(device)  # right padding
        attention_mask = pad([torch.ones(len(encoded[i]), dtype=torch.long) for i in batch]).to(device)
        special = special_tokens_mask(input_ids, tokenizer) if pooling == "mean_no_special" else None
        outputs = decoder(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
        )
        hidden_states = outputs.hidden_states if hasattr(outputs, "hidden_states") else outputs[-1]
        if hidden_states is None:
            raise RuntimeError(f"{type(decoder).__name__} returned no hidden_states for output_hidden_states=True.")
        states = torch.stack(
            [pool(layer_states.float(), attention_mask, pooling, special) for layer_states in hidden_states]
        )  # (num_layers + 1, batch, hidden)
        if pooled is None:
            pooled = torch.empty((states.shape[0], len(sentences), states.shape[-1]), dtype=torch.float32)
        pooled[:, torch.tensor(batch)] = states.cpu()
    return pooled


def _retrieval_scores(source: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """
    Scores of the aligned rows of `source` and `target`, both (layers, n, hidden); row i of each side is a pair.

    Returns per-layer tensors (layers,): source->target and target->source accuracy and the similarity gap.
    """
    n = source.shape[1]
    similarity = F.normalize(source.float(), dim=-1) @ F.normalize(target.float(), dim=-1).transpose(1, 2)  # (L, n, n)
    diagonal = similarity.diagonal(dim1=1, dim2=2)  # (L, n)
    off_diagonal = similarity.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))  # (L, n, n)
    # A hit needs the translation to be strictly nearer than every other candidate (a tie is a miss).
    source_to_target = (diagonal > off_diagonal.amax(dim=2)).sum(dim=1).double() / n  # (L,)
    target_to_source = (diagonal > off_diagonal.amax(dim=1)).sum(dim=1).double() / n  # (L,)
    off_mean = (similarity.sum(dim=(1, 2)) - diagonal.sum(dim=1)) / (n * (n - 1))  # (L,)
    return {
        "source_to_target_accuracy": source_to_target,
        "target_to_source_accuracy": target_to_source,
        "retrieval_accuracy": (source_to_target + target_to_source) / 2,
        "similarity_gap": diagonal.mean(dim=1) - off_mean,
    }


def probe_groups(
    model: nn.Module,
    tokenizer,
    groups: dict[str, tuple[list[str], list[str]]],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    pooling: PoolingMode = "mean",
    show_progress: bool | None = None,
    model_name: str | None = None,
) -> ProbeResult:
    """[`probe_layers`] on pairs already grouped by [`group_pairs`] (the callback groups them once, probes often)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if max_length < 2:
        raise ValueError(
            f"max_length={max_length}: a sentence needs at least 2 tokens (with a BOS token, 1 token leaves every "
            "sentence the same), as align_max_length in training. Pass max_length >= 2 (default 128)."
        )
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not supported; choose one of {list(POOLINGS)}.")
    # Each distinct sentence is encoded once (English sides are often shared between languages).
    index: dict[str, int] = {}
    for sources, targets in groups.values():
        for sentence in (*sources, *targets):
            index.setdefault(sentence, len(index))
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        pooled = _encode(
            model,
            tokenizer,
            list(index),
            batch_size=batch_size,
            max_length=max_length,
            pooling=pooling,
            show_progress=show_progress,
        )
    finally:
        for module, training in modes:
            module.training = training

    scores: dict[str, dict[str, list[float]]] = {metric: {} for metric in _METRICS}
    for language, (sources, targets) in groups.items():
        result = _retrieval_scores(pooled[:, [index[s] for s in sources]], pooled[:, [index[t] for t in targets]])
        for metric in _METRICS:
            scores[metric][language] = result[metric].tolist()
    for per_language in scores.values():
        per_language[MEAN] = torch.tensor(list(per_language.values())).mean(dim=0).tolist()
    return ProbeResult(
        layers=list(range(pooled.shape[0])),
        languages=list(groups),
        **scores,
        num_pairs={language: len(sources) for language, (sources, _) in groups.items()},
        model_name=model_name if model_name is not None else _model_name(model),
        pooling=pooling,
    )


def probe_layers(
    model: nn.Module,
    tokenizer,
    pairs,
    *,
    batch_size: int = 32,
    max_length: int = 128,
    pooling: PoolingMode = "mean",
    languages: list[str] | None = None,
    max_pairs_per_language: int | None = None,
    source_column: str = "parallel_source",
    target_column: str = "parallel_target",
    language_column: str = "language",
    show_progress: bool | None = None,
) -> ProbeResult:
    r"""
    Measure how well parallel sentences are aligned at every layer of a causal LM.

    Each sentence is tokenized as raw text with the tokenizer's own special tokens (no chat template), truncated to
    `max_length` tokens, and run through the model's decoder (no LM head) with `output_hidden_states=True`: one
    forward per batch gives all layers. The states of each layer are pooled with [`~trl_midalign.losses.pool`], as
    the alignment loss pools them. Within each language, with `s_i` and `t_i` the pooled source and target of pair
    `i` and `cos` the cosine similarity (computed in float32):

    - source->target accuracy: fraction of `i` with `cos(s_i, t_i) > cos(s_i, t_j)` for every `j != i`;
    - target->source accuracy: fraction of `i` with `cos(t_i, s_i) > cos(t_i, s_j)` for every `j != i`;
    - `retrieval_accuracy`: the mean of the two;
    - `similarity_gap`: mean of `cos(s_i, t_i)` minus the mean of `cos(s_i, t_j)` over all `i != j`.

    `"mean"` averages each score over the languages (unweighted). Runs under `torch.no_grad` on the model's device
    and dtype; the train/eval mode of every submodule is restored afterwards. Chance level of the accuracy is about
    `1 / num_pairs`.

    Args:
        model (`torch.nn.Module`):
            A causal LM: a [`~transformers.PreTrainedModel`], a [`~peft.PeftModel`], or either of them wrapped by
            DDP or a DeepSpeed engine (under ZeRO-3 call this on every rank).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The model's tokenizer.
        pairs (`datasets.Dataset` or `list[dict]`):
            One pair per row: the non-English side in `source_column`, its translation (usually English) in
            `target_column` and the language code of the source in `language_column`. Without a language column
            all pairs form one group named `"all"`. A pair without a sentence on each side is an error (see
            [`~trl_midalign.data.check_pairs`]); a pair that repeats a sentence of an earlier pair of its language,
            and a language with fewer than 2 pairs, are skipped with a warning.
        batch_size (`int`, *optional*, defaults to `32`):
            Sentences per forward pass (sources and targets are batched together, sorted by length).
        max_length (`int`, *optional*, defaults to `128`):
            Maximum number of tokens per sentence; longer sentences are truncated.
        pooling (`str`, *optional*, defaults to `"mean"`):
            `"mean"`, `"mean_no_special"` or `"last"`, as `AlignmentConfig.align_pooling`.
        languages (`list[str]` or `None`, *optional*, defaults to `None`):
            Languages to probe, in this order; all languages of the data when `None`.
        max_pairs_per_language (`int` or `None`, *optional*, defaults to `None`):
            Probe only the first this many pairs of each language.
        source_column (`str`, *optional*, defaults to `"parallel_source"`):
            Column with the source (non-English) sentence.
        target_column (`str`, *optional*, defaults to `"parallel_target"`):
            Column with the target (English) sentence.
        language_column (`str`, *optional*, defaults to `"language"`):
            Column with the language of the pair.
        show_progress (`bool` or `None`, *optional*, defaults to `None`):
            Show a progress bar; `None` shows one when there are more than 8 batches.

    Returns:
        [`ProbeResult`]: Scores per layer (0 = embeddings .. N) and language, with the recommended layer.

    Example:

    ```python
    >>> from trl_midalign import probe_layers
    >>> result = probe_layers(model, tokenizer, pairs, languages=["de", "fr"], max_pairs_per_language=64)
    >>> print(result.to_markdown())
    >>> result.recommended_layer
    11
    ```
    """
    groups = group_pairs(
        pairs,
        source_column=source_column,
        target_column=target_column,
        language_column=language_column,
        languages=languages,
        max_pairs_per_language=max_pairs_per_language,
    )
    return probe_groups(
        model,
        tokenizer,
        groups,
        batch_size=batch_size,
        max_length=max_length,
        pooling=pooling,
        show_progress=show_progress,
    )
