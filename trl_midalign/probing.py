"""Per-layer cross-lingual alignment probing (the analysis of Liu & Niehues, 2025, Section 3).

For every layer of a causal LM (0 = embedding output .. N = last block, transformers' `hidden_states`
convention), parallel sentences are mean-pooled and compared by cosine similarity: how often is the nearest
sentence on the other side the true translation (retrieval accuracy), and how much more similar are true pairs
than non-pairs (similarity gap). Parallel sentences are most similar in the middle layers, which is where
[`AlignmentTrainer`] adds its alignment loss.
"""

import csv
import io
import json
import math
import os
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from .layers import get_decoder
from .losses import masked_mean_pool
from .modeling import load_causal_lm, load_tokenizer


_PLOT_INSTALL_HINT = 'Plotting needs matplotlib: `pip install "trl-midalign[plot]"` (or `pip install matplotlib`).'
_MEAN = "mean"
_ALL_PAIRS = "all"
_JSON_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------------
# Result object
# ---------------------------------------------------------------------------------------------------------------------


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
    """

    layers: list[int]
    languages: list[str]
    retrieval_accuracy: dict[str, list[float]]
    source_to_target_accuracy: dict[str, list[float]]
    target_to_source_accuracy: dict[str, list[float]]
    similarity_gap: dict[str, list[float]]
    num_pairs: dict[str, int]
    model_name: str | None = None
    recommended_layer: int | None = field(default=None)

    def __post_init__(self):
        if self.recommended_layer is None:
            self.recommended_layer = recommend_layer(self.retrieval_accuracy[_MEAN], self.layers)

    def to_dict(self) -> dict[str, Any]:
        """
        The result as a JSON-serialisable dict, in the stable `probe.json` layout.

        Returns:
            `dict`: Keys `layers`, `languages`, `retrieval_accuracy` (`{language: [one value per layer], ...,
            "mean": [...]}`), `recommended_layer`, `model_name`, `num_pairs`, plus `source_to_target_accuracy`,
            `target_to_source_accuracy`, `similarity_gap` (same layout as `retrieval_accuracy`) and
            `format_version`.
        """
        return {
            "format_version": _JSON_FORMAT_VERSION,
            "model_name": self.model_name,
            "layers": list(self.layers),
            "languages": list(self.languages),
            "num_pairs": dict(self.num_pairs),
            "recommended_layer": self.recommended_layer,
            "retrieval_accuracy": {k: list(v) for k, v in self.retrieval_accuracy.items()},
            "source_to_target_accuracy": {k: list(v) for k, v in self.source_to_target_accuracy.items()},
            "target_to_source_accuracy": {k: list(v) for k, v in self.target_to_source_accuracy.items()},
            "similarity_gap": {k: list(v) for k, v in self.similarity_gap.items()},
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
        empty = {language: [] for language in [*data["languages"], _MEAN]}
        return cls(
            layers=[int(layer) for layer in data["layers"]],
            languages=list(data["languages"]),
            retrieval_accuracy={k: list(v) for k, v in data["retrieval_accuracy"].items()},
            source_to_target_accuracy=dict(data.get("source_to_target_accuracy", empty)),
            target_to_source_accuracy=dict(data.get("target_to_source_accuracy", empty)),
            similarity_gap=dict(data.get("similarity_gap", empty)),
            num_pairs={k: int(v) for k, v in data["num_pairs"].items()},
            model_name=data.get("model_name"),
            recommended_layer=data.get("recommended_layer"),
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
        scores = self._metric(metric)
        columns = [*self.languages, _MEAN]
        header = "| layer | " + " | ".join(
            f"{c} (n={self.num_pairs[c]})" if c in self.num_pairs else c for c in columns
        )
        lines = [header + " |", "|" + "---:|" * (len(columns) + 1)]
        for i, layer in enumerate(self.layers):
            mark = "*" if layer == self.recommended_layer else ""
            values = " | ".join(_format(scores[c][i]) for c in columns)
            lines.append(f"| {layer}{mark} | {values} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def plot(self, output_dir: str | os.PathLike, prefix: str = "probe") -> list[str]:
        """
        Save a heatmap (languages x layers, retrieval accuracy) and a curve (retrieval accuracy and similarity gap
        per layer, one thin line per language and a thick mean) as PNG files.

        Needs matplotlib (`pip install "trl-midalign[plot]"`); uses the non-interactive Agg backend.

        Args:
            output_dir (`str` or `os.PathLike`):
                Directory to write into (created if needed).
            prefix (`str`, *optional*, defaults to `"probe"`):
                File name prefix: the files are `{prefix}_heatmap.png` and `{prefix}_curve.png`.

        Returns:
            `list[str]`: The paths written (heatmap first).
        """
        plt = _pyplot()
        output_dir = os.fspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        from matplotlib.ticker import MaxNLocator

        name = os.path.basename(os.path.normpath(self.model_name)) if self.model_name else "model"
        title = f"{name}: retrieval accuracy of mean-pooled parallel sentences"
        rows = [*self.languages, _MEAN]
        matrix = [self.retrieval_accuracy[row] for row in rows]

        width = max(6.0, 0.45 * len(self.layers) + 2.0)
        fig, ax = plt.subplots(figsize=(width, 0.45 * len(rows) + 2.0))
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(self.layers)), [str(layer) for layer in self.layers])
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("layer (0 = embeddings)")
        ax.set_title(title, fontsize=10)
        if len(self.layers) * len(rows) <= 600:
            for r, values in enumerate(matrix):
                for c, value in enumerate(values):
                    if not math.isnan(value):
                        color = "black" if value > 0.6 else "white"
                        ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6, color=color)
        fig.colorbar(image, ax=ax, label="retrieval accuracy")
        fig.tight_layout()
        heatmap_path = os.path.join(output_dir, f"{prefix}_heatmap.png")
        fig.savefig(heatmap_path, dpi=120)
        plt.close(fig)

        fig, (acc_ax, gap_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
        for axis, scores, label in (
            (acc_ax, self.retrieval_accuracy, "retrieval accuracy"),
            (gap_ax, self.similarity_gap, "similarity gap (pairs - non-pairs)"),
        ):
            for language in self.languages:
                if scores.get(language):
                    axis.plot(self.layers, scores[language], linewidth=1, alpha=0.6, label=language)
            if scores.get(_MEAN):
                axis.plot(self.layers, scores[_MEAN], linewidth=2.5, color="black", label=_MEAN)
            if self.recommended_layer is not None:
                axis.axvline(self.recommended_layer, color="red", linestyle="--", linewidth=1)
            axis.set_xlabel("layer (0 = embeddings)")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
        acc_ax.set_ylim(0.0, 1.0)
        acc_ax.set_title(f"recommended layer: {self.recommended_layer} (dashed)", fontsize=10)
        acc_ax.legend(fontsize=7, ncol=2)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        curve_path = os.path.join(output_dir, f"{prefix}_curve.png")
        fig.savefig(curve_path, dpi=120)
        plt.close(fig)
        return [heatmap_path, curve_path]

    def _metric(self, metric: str) -> dict[str, list[float]]:
        names = ("retrieval_accuracy", "source_to_target_accuracy", "target_to_source_accuracy", "similarity_gap")
        if metric not in names:
            raise ValueError(f"Unknown metric {metric!r}; choose one of {list(names)}.")
        return getattr(self, metric)


def _format(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(_PLOT_INSTALL_HINT) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def recommend_layer(mean_retrieval_accuracy: list[float], layers: list[int] | None = None) -> int:
    """
    The layer with the highest mean retrieval accuracy, layer 0 excluded.

    Layer 0 (the embedding output) is context-free and no block can be trained to change it, so it is never
    recommended. Ties go to the lower layer: the alignment step only runs the blocks below the aligned layer, so a
    lower layer is cheaper, and it leaves more blocks above it free for the task.

    Args:
        mean_retrieval_accuracy (`list[float]`):
            One value per layer (`ProbeResult.retrieval_accuracy["mean"]`).
        layers (`list[int]` or `None`, *optional*, defaults to `None`):
            The layer index of each value; `0 .. len - 1` when `None`.

    Returns:
        `int`: The recommended layer index.
    """
    layers = list(range(len(mean_retrieval_accuracy))) if layers is None else list(layers)
    candidates = [(value, layer) for layer, value in zip(layers, mean_retrieval_accuracy) if layer > 0]
    if not candidates:
        raise ValueError("Cannot recommend a layer: the probe has no layer above 0 (the embedding output).")
    best = max(value for value, _ in candidates)
    return min(layer for value, layer in candidates if value >= best - 1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# Data preparation
# ---------------------------------------------------------------------------------------------------------------------


def _group_pairs(
    pairs,
    *,
    source_column: str,
    target_column: str,
    language_column: str,
    languages: list[str] | None,
    max_pairs_per_language: int | None,
) -> dict[str, tuple[list[str], list[str]]]:
    """Validate the pairs and group them by language: {language: (sources, targets)}, in order of appearance."""
    if max_pairs_per_language is not None and max_pairs_per_language < 2:
        raise ValueError(
            f"max_pairs_per_language={max_pairs_per_language}: retrieval needs at least 2 pairs per language; pass "
            "a value >= 2 or None for all pairs."
        )
    if isinstance(pairs, Mapping):
        raise ValueError(
            "pairs must be a datasets.Dataset or a list of dicts (one pair per row), got a single dict. For a dict "
            "of columns use datasets.Dataset.from_dict(...)."
        )
    column_names = getattr(pairs, "column_names", None)
    if column_names is not None:  # datasets.Dataset: read whole columns, which is much faster than rows
        if isinstance(column_names, dict):
            raise ValueError(
                f"pairs is a DatasetDict; pass one split, for example pairs['train'] (splits: {list(column_names)})."
            )
        for name in (source_column, target_column):
            if name not in column_names:
                raise ValueError(
                    f"The pairs have no column {name!r} (columns: {column_names}). Rename the column or pass "
                    "source_column= / target_column= (CLI: --source_column / --target_column)."
                )
        sources, targets = pairs[source_column], pairs[target_column]
        has_language = language_column in column_names
        langs = pairs[language_column] if has_language else [_ALL_PAIRS] * len(sources)
    else:
        rows = list(pairs)
        sources, targets, langs = [], [], []
        has_language = any(isinstance(row, Mapping) and language_column in row for row in rows)
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"pairs[{index}] is a {type(row).__name__}, expected a dict with the pair's columns.")
            for name in (source_column, target_column):
                if name not in row:
                    raise ValueError(
                        f"pairs[{index}] has no key {name!r} (keys: {sorted(row)}). Rename the key or pass "
                        "source_column= / target_column= (CLI: --source_column / --target_column)."
                    )
            sources.append(row[source_column])
            targets.append(row[target_column])
            langs.append(row.get(language_column, _ALL_PAIRS))

    if languages is not None and not has_language:
        raise ValueError(
            f"languages={list(languages)} was given but the pairs have no {language_column!r} column to select them "
            "by. Name the column with language_column= (CLI: --language_column), or leave languages out to probe all "
            "pairs as one group."
        )
    groups: dict[str, tuple[list[str], list[str]]] = {}
    seen: dict[str, set[tuple[str, str]]] = {}
    dropped = duplicates = 0
    for source, target, language in zip(sources, targets, langs):
        language = _ALL_PAIRS if language is None else str(language)
        if language == _MEAN:
            raise ValueError(
                f"A language is named {_MEAN!r}, which is reserved for the average over languages; rename it."
            )
        source_ok = isinstance(source, str) and source.strip()
        target_ok = isinstance(target, str) and target.strip()
        if not (source_ok and target_ok):
            dropped += 1
            continue
        # A sentence that occurs twice on a side makes retrieval ambiguous (two rows with the same representation).
        language_seen = seen.setdefault(language, set())
        if ("s", source) in language_seen or ("t", target) in language_seen:
            duplicates += 1
            continue
        language_seen.update((("s", source), ("t", target)))
        group = groups.setdefault(language, ([], []))
        group[0].append(source)
        group[1].append(target)
    if dropped:
        warnings.warn(
            f"Dropped {dropped} pair(s) whose {source_column!r} or {target_column!r} is empty, whitespace or not a "
            "string.",
            stacklevel=3,
        )
    if duplicates:
        warnings.warn(
            f"Dropped {duplicates} pair(s) that repeat a source or target sentence of an earlier pair of the same "
            "language: retrieval cannot tell identical sentences apart.",
            stacklevel=3,
        )

    if languages is not None:
        languages = [str(language) for language in languages]
        unknown = [language for language in languages if language not in groups]
        if unknown:
            raise ValueError(
                f"Unknown language(s) {unknown}: the pairs' {language_column!r} column has {sorted(groups)} "
                "(after dropping empty sentences). Pass languages from that list, or None for all."
            )
        groups = {language: groups[language] for language in dict.fromkeys(languages)}

    result = {}
    too_small = []
    for language, (language_sources, language_targets) in groups.items():
        if max_pairs_per_language is not None:
            language_sources = language_sources[:max_pairs_per_language]
            language_targets = language_targets[:max_pairs_per_language]
        if len(language_sources) < 2:
            too_small.append(f"{language} ({len(language_sources)})")
            continue
        result[language] = (language_sources, language_targets)
    if too_small:
        warnings.warn(
            f"Skipped language(s) with fewer than 2 pairs, where retrieval is meaningless: {', '.join(too_small)}.",
            stacklevel=3,
        )
    if not result:
        raise ValueError(
            "No language has at least 2 usable pairs to probe. Check the data file and the "
            f"{source_column!r} / {target_column!r} / {language_column!r} columns."
        )
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Encoding and scoring
# ---------------------------------------------------------------------------------------------------------------------


def _model_name(model: nn.Module) -> str | None:
    config = getattr(get_decoder(model), "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return name or None


def _device_of(module: nn.Module) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


@torch.no_grad()
def _encode(
    model: nn.Module,
    tokenizer,
    sentences: list[str],
    *,
    batch_size: int,
    max_length: int,
    show_progress: bool | None,
) -> torch.Tensor:
    """Mean-pooled states of every sentence at every layer: float32 tensor (num_layers + 1, num_sentences, hidden)."""
    from tqdm.auto import tqdm

    decoder = get_decoder(model)
    device = _device_of(decoder)
    encoded = tokenizer(sentences, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory error shows up at once.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if show_progress is None:
        show_progress = len(batches) > 8
    pooled: torch.Tensor | None = None
    for batch in tqdm(batches, desc="Probing layers", unit="batch", disable=not show_progress):
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # right padding
            input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            attention_mask[row, : len(encoded[i])] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        outputs = decoder(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
        )
        hidden_states = outputs.hidden_states if hasattr(outputs, "hidden_states") else outputs[-1]
        if hidden_states is None:
            raise RuntimeError(f"{type(decoder).__name__} returned no hidden_states for output_hidden_states=True.")
        states = torch.stack(
            [masked_mean_pool(layer_states.float(), attention_mask) for layer_states in hidden_states]
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
        "source_to_target": source_to_target,
        "target_to_source": target_to_source,
        "gap": diagonal.mean(dim=1) - off_mean,
    }


def _probe_groups(
    model: nn.Module,
    tokenizer,
    groups: dict[str, tuple[list[str], list[str]]],
    *,
    batch_size: int,
    max_length: int,
    show_progress: bool | None,
    model_name: str | None = None,
) -> ProbeResult:
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}.")
    # Each distinct sentence is encoded once (English sides are often shared between languages).
    index: dict[str, int] = {}
    for sources, targets in groups.values():
        for sentence in (*sources, *targets):
            index.setdefault(sentence, len(index))
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        pooled = _encode(
            model, tokenizer, list(index), batch_size=batch_size, max_length=max_length, show_progress=show_progress
        )
    finally:
        for module, training in modes:
            module.training = training

    scores: dict[str, dict[str, list[float]]] = {"s2t": {}, "t2s": {}, "acc": {}, "gap": {}}
    for language, (sources, targets) in groups.items():
        source = pooled[:, [index[s] for s in sources]]
        target = pooled[:, [index[t] for t in targets]]
        result = _retrieval_scores(source, target)
        scores["s2t"][language] = result["source_to_target"].tolist()
        scores["t2s"][language] = result["target_to_source"].tolist()
        scores["acc"][language] = ((result["source_to_target"] + result["target_to_source"]) / 2).tolist()
        scores["gap"][language] = result["gap"].tolist()
    for per_language in scores.values():
        per_language[_MEAN] = torch.tensor(list(per_language.values())).mean(dim=0).tolist()
    return ProbeResult(
        layers=list(range(pooled.shape[0])),
        languages=list(groups),
        retrieval_accuracy=scores["acc"],
        source_to_target_accuracy=scores["s2t"],
        target_to_source_accuracy=scores["t2s"],
        similarity_gap=scores["gap"],
        num_pairs={language: len(sources) for language, (sources, _) in groups.items()},
        model_name=model_name if model_name is not None else _model_name(model),
    )


def probe_layers(
    model: nn.Module,
    tokenizer,
    pairs,
    *,
    batch_size: int = 32,
    max_length: int = 128,
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
    forward per batch gives all layers. The states of each layer are mean-pooled over the attention mask. Within
    each language, with `s_i` and `t_i` the pooled source and target of pair `i` and `cos` the cosine similarity
    (computed in float32):

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
            all pairs form one group named `"all"`. Pairs with an empty side are dropped with a warning; languages
            with fewer than 2 pairs are skipped with a warning.
        batch_size (`int`, *optional*, defaults to `32`):
            Sentences per forward pass (sources and targets are batched together, sorted by length).
        max_length (`int`, *optional*, defaults to `128`):
            Maximum number of tokens per sentence; longer sentences are truncated.
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
    groups = _group_pairs(
        pairs,
        source_column=source_column,
        target_column=target_column,
        language_column=language_column,
        languages=languages,
        max_pairs_per_language=max_pairs_per_language,
    )
    return _probe_groups(
        model, tokenizer, groups, batch_size=batch_size, max_length=max_length, show_progress=show_progress
    )


# ---------------------------------------------------------------------------------------------------------------------
# Command line: `trl-midalign probe`
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ProbeArguments:
    r"""
    Arguments of `trl-midalign probe`.

    Args:
        model_name_or_path (`str`):
            Directory of a transformers causal LM, a `.gguf` file, or a Hub model id.
        data (`str`):
            Parallel pairs: a JSONL/JSON/CSV/TSV/Parquet file, a directory saved with `Dataset.save_to_disk`, or
            anything `datasets.load_dataset` accepts.
        output_dir (`str`):
            Where to write `probe.json`, `probe_heatmap.png` and `probe_curve.png`.
        languages (`list[str]` or `None`, *optional*, defaults to `None`):
            Languages to probe; all languages of the data when not given.
        max_pairs_per_language (`int` or `None`, *optional*, defaults to `None`):
            Probe only the first this many pairs of each language.
        batch_size (`int`, *optional*, defaults to `32`):
            Sentences per forward pass.
        max_length (`int`, *optional*, defaults to `128`):
            Maximum tokens per sentence.
        source_column (`str`, *optional*, defaults to `"parallel_source"`):
            Column with the non-English sentence.
        target_column (`str`, *optional*, defaults to `"parallel_target"`):
            Column with its (English) translation.
        language_column (`str`, *optional*, defaults to `"language"`):
            Column with the language code of the pair.
        data_split (`str`, *optional*, defaults to `"train"`):
            Split to read when `data` holds several.
        dtype (`str`, *optional*, defaults to `"auto"`):
            `"auto"`, `"float32"`, `"bfloat16"` or `"float16"`.
        device (`str` or `None`, *optional*, defaults to `None`):
            Device to run on; `"cuda"` when available, else `"cpu"`.
        plot (`bool`, *optional*, defaults to `True`):
            Write the PNG plots (needs matplotlib).
    """

    model_name_or_path: str = field(
        metadata={"help": "Directory of a transformers causal LM, a .gguf file, or a Hub model id."}
    )
    data: str = field(
        metadata={
            "help": "Parallel pairs, one per row: a JSONL/JSON/CSV/TSV/Parquet file, a directory saved with "
            "Dataset.save_to_disk, or anything datasets.load_dataset accepts."
        }
    )
    output_dir: str = field(metadata={"help": "Directory for probe.json, probe_heatmap.png and probe_curve.png."})
    languages: list[str] | None = field(
        default=None, metadata={"help": "Languages to probe (space separated); all languages of the data if omitted."}
    )
    max_pairs_per_language: int | None = field(
        default=None, metadata={"help": "Probe only the first N pairs of each language (at least 2)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Sentences per forward pass."})
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per sentence; longer ones are truncated."})
    source_column: str = field(
        default="parallel_source", metadata={"help": "Column with the source (non-English) sentence."}
    )
    target_column: str = field(
        default="parallel_target", metadata={"help": "Column with the target (English) sentence."}
    )
    language_column: str = field(
        default="language",
        metadata={"help": "Column with the language of each pair; without it all pairs form one group 'all'."},
    )
    data_split: str = field(default="train", metadata={"help": "Split to read when the data has several."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Model dtype: 'auto' (float32 on CPU, the checkpoint's dtype on GPU), 'float32', 'bfloat16' or "
            "'float16'. Cosine similarities are always computed in float32.",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )
    device: str | None = field(
        default=None, metadata={"help": "Device to run on (e.g. 'cpu', 'cuda:0'); 'cuda' when available, else 'cpu'."}
    )
    plot: bool = field(default=True, metadata={"help": "Write the heatmap and curve PNGs (needs matplotlib)."})

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1.")
        if self.max_length < 1:
            raise ValueError(f"max_length={self.max_length} must be at least 1.")
        if self.max_pairs_per_language is not None and self.max_pairs_per_language < 2:
            raise ValueError(
                f"max_pairs_per_language={self.max_pairs_per_language}: retrieval needs at least 2 pairs per "
                "language; pass a value >= 2 or leave it out."
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: choose 'auto', 'float32', 'bfloat16' or 'float16'.")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


class _PairsFileError(ValueError):
    """A `--data` file that cannot be read as pairs; the message names the file, the line and the fix."""


def _example_row(source_column: str, target_column: str, language_column: str) -> str:
    row = {language_column: "de", source_column: "Guten Morgen", target_column: "Good morning"}
    return json.dumps(row, ensure_ascii=False)


def _utf8_name(path: str) -> str:
    stem, extension = os.path.splitext(path)
    return f"{stem}-utf8{extension}"


def _decode_utf8(path: str, data: bytes) -> str:
    """The text of `data`, or an error naming the line and column of the first byte that is not UTF-8."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise _PairsFileError(
            f"{path} is UTF-16 encoded (it starts with a UTF-16 byte-order mark); --data files must be UTF-8. Convert "
            f"it, for example with `iconv -f UTF-16 -t UTF-8 {path} > {_utf8_name(path)}`."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise _PairsFileError(
            f"{path}, line {line}: not valid UTF-8 (byte 0x{data[error.start]:02x} at byte {column} of the line). "
            "--data files must be UTF-8: convert the file from its real encoding, for example with "
            f"`iconv -f LATIN1 -t UTF-8 {path} > {_utf8_name(path)}` (LATIN1 standing for that "
            "encoding), or fix that line."
        ) from None
    return text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is harmless


def _read_jsonl(path: str, text: str, example: str) -> tuple[list[Any], list[str]]:
    rows, where = [], []
    # Split on "\n" only: str.splitlines() would also split on U+2028 and other separators, which JSON strings may hold.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise _PairsFileError(
                f"{path}, line {number}: not valid JSON ({error.msg}: column {error.colno}). Each line of a JSONL "
                f"file must be one complete JSON object with the pair's columns, for example {example}. Fix or "
                "remove that line."
            ) from None
        where.append(f"line {number}")
    return rows, where


def _read_json(path: str, text: str, example: str) -> tuple[list[Any], list[str]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # more than one top-level value: JSON Lines in a .json file
            return _read_jsonl(path, text, example)
        raise _PairsFileError(
            f"{path}, line {error.lineno}: not valid JSON ({error.msg}: column {error.colno}). A .json file must "
            f"hold a list of objects, one per pair, or one object per line (JSON Lines), for example {example}. Fix "
            "the file at that line."
        ) from None
    if isinstance(value, dict) and value and all(isinstance(column, list) for column in value.values()):
        lengths = {name: len(column) for name, column in value.items()}
        if len(set(lengths.values())) > 1:
            raise _PairsFileError(
                f"{path} holds columns of different lengths {lengths}; every column needs one value per pair."
            )
        count = next(iter(lengths.values()))
        rows = [{name: column[i] for name, column in value.items()} for i in range(count)]
        return rows, [f"row {i} of its columns" for i in range(count)]
    if isinstance(value, dict):
        return [value], ["its top-level object"]
    if isinstance(value, list):
        return value, [f"item {i} of its top-level list" for i in range(len(value))]
    raise _PairsFileError(
        f"{path} holds a single JSON {type(value).__name__}; it must hold a list of objects, one per pair, or one "
        f"object per line (JSON Lines), for example {example}."
    )


def _read_csv(path: str, text: str, delimiter: str) -> tuple[list[Any], list[str]]:
    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows, where = [], []
    header, start = None, 1  # start: the line where the record being read begins
    try:
        for row in reader:
            if row and header is None:
                header = row
                duplicated = sorted({name for name in header if header.count(name) > 1})
                if duplicated:
                    raise _PairsFileError(
                        f"{path}, line {start}: the header names the column(s) {duplicated} more than once; give "
                        "every column a distinct name."
                    )
            elif row:
                if len(row) != len(header):
                    raise _PairsFileError(
                        f"{path}, line {start}: {len(row)} field(s), but the header has {len(header)} ({header}). "
                        f'Quote fields that contain the delimiter {delimiter!r} ("..."), or fix that line.'
                    )
                rows.append(dict(zip(header, row)))
                where.append(f"line {start}")
            start = reader.line_num + 1
    except csv.Error as error:
        raise _PairsFileError(
            f"{path}, line {start}: not valid {kind} ({error}). Fix that line: a quoted field must be closed by a "
            'quote followed by the delimiter or the end of the line (write a quote inside it as "").'
        ) from None
    if header is None:
        return [], []
    if not rows:
        raise _PairsFileError(
            f"{path} has a header line ({header}) but no rows: there are no pairs to probe. Add one pair per line."
        )
    return rows, where


def _read_pairs_text_file(
    path: str, extension: str, source_column: str, target_column: str, language_column: str
) -> list[dict]:
    """
    Rows of a JSONL, JSON, CSV or TSV file, read with the standard library so that every error names the file and
    the line (datasets reports neither), and every row checked for the pair's columns.
    """
    example = _example_row(source_column, target_column, language_column)
    with open(path, "rb") as f:
        data = f.read()
    text = _decode_utf8(path, data)
    if not text.strip():
        raise _PairsFileError(
            f"{path} is empty: it holds no pairs. Write one pair per line, for example {example}"
            + (" (JSONL)." if extension in (".jsonl", ".json") else ", or a CSV/TSV file with a header line.")
        )
    if extension == ".jsonl":
        rows, where = _read_jsonl(path, text, example)
    elif extension == ".json":
        rows, where = _read_json(path, text, example)
    else:
        rows, where = _read_csv(path, text, "\t" if extension == ".tsv" else ",")
    if not rows:
        raise _PairsFileError(
            f"{path} holds no pairs (an empty list). Add one object per pair, for example {example}."
        )
    has_language = False
    for row, location in zip(rows, where):
        if not isinstance(row, dict):
            raise _PairsFileError(
                f"{path}, {location}: a JSON {type(row).__name__} ({json.dumps(row, ensure_ascii=False)[:80]}), "
                f"expected an object with the pair's columns, for example {example}."
            )
        missing = [name for name in (source_column, target_column) if name not in row]
        if missing:
            raise _PairsFileError(
                f"{path}, {location}: no {' and no '.join(map(repr, missing))} (columns there: {sorted(row)}). "
                f"Every pair needs {source_column!r} and {target_column!r}: rename the columns in the file, or name "
                "yours with --source_column / --target_column."
            )
        has_language = has_language or language_column in row
    if has_language:
        for row, location in zip(rows, where):
            if language_column not in row:
                raise _PairsFileError(
                    f"{path}, {location}: no {language_column!r}, which the other rows have. Give every pair its "
                    f"language (or leave the column out everywhere to probe all pairs as one group)."
                )
    return rows


def _dataset_error(path: str, error: BaseException) -> ValueError:
    """A datasets failure re-raised with the path and the underlying cause, which datasets' own message hides."""
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    detail = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
    return ValueError(
        f"--data {path!r} could not be read by datasets ({detail}). Check that it is a complete, valid file of its "
        "format, or pass the pairs as a JSONL file (one JSON object per line: language, parallel_source, "
        "parallel_target), which is read with exact line numbers in any error."
    )


def _load_pairs_file(
    path: str,
    split: str,
    source_column: str = "parallel_source",
    target_column: str = "parallel_target",
    language_column: str = "language",
):
    import datasets

    if os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, name)) for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    ):
        try:
            data = datasets.load_from_disk(path)
        except (OSError, ValueError, KeyError) as error:
            raise _dataset_error(path, error) from error
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"{path} has the splits {list(data)}, not {split!r}; pass --data_split.")
            data = data[split]
        return data
    if os.path.isfile(path):
        extension = os.path.splitext(path)[1].lower()
        if extension not in _DATA_BUILDERS:
            raise ValueError(
                f"Cannot read {path}: use a JSONL, JSON, CSV, TSV or Parquet file (one pair per row with the columns "
                "language, parallel_source, parallel_target), or a directory saved with Dataset.save_to_disk."
            )
        if extension != ".parquet":
            return _read_pairs_text_file(path, extension, source_column, target_column, language_column)
        try:
            return datasets.load_dataset("parquet", data_files=path, split="train")
        except (datasets.exceptions.DatasetGenerationError, OSError, ValueError, StopIteration) as error:
            raise _dataset_error(path, error) from error
    if os.path.isdir(path) or (_HUB_ID.fullmatch(path) and not path.startswith(".")):
        try:
            return datasets.load_dataset(path, split=split)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"--data {path!r} is neither a local file nor a loadable dataset: {error}"
            ) from error
        except (datasets.exceptions.DatasetGenerationError, UnicodeDecodeError, StopIteration) as error:
            raise _dataset_error(path, error) from error
    raise FileNotFoundError(
        f"--data {path!r} does not exist. Pass a JSONL file with one pair per row (language, parallel_source, "
        "parallel_target), or a dataset name/directory that datasets.load_dataset accepts."
    )


def _load_model_and_tokenizer(path: str, dtype: str, device: str):
    is_gguf = path.lower().endswith(".gguf")
    if not os.path.exists(path) and (is_gguf or not _HUB_ID.fullmatch(path) or path.startswith(".")):
        raise FileNotFoundError(
            f"--model_name_or_path {path!r} does not exist. Pass a directory holding a transformers causal LM "
            "(config.json and weights), a .gguf file, or a Hub model id."
        )
    if dtype == "auto":
        torch_dtype = torch.float32 if device == "cpu" else "auto"
    else:
        torch_dtype = getattr(torch, dtype)
    try:
        model = load_causal_lm(path, dtype=torch_dtype)
        tokenizer = load_tokenizer(path)
    except FileNotFoundError:
        raise
    except OSError as error:  # for example a Hub id that cannot be reached
        raise FileNotFoundError(f"Could not load a causal LM and its tokenizer from {path!r}: {error}") from error
    return model.to(device), tokenizer


def run_probe(args: ProbeArguments) -> ProbeResult:
    """
    Run `trl-midalign probe`: probe a model on parallel pairs, write `probe.json` and the plots into
    `args.output_dir`, and print the table and the recommended layer.

    Args:
        args ([`ProbeArguments`]):
            The command's arguments.

    Returns:
        [`ProbeResult`]: The probe result that was written.
    """
    if args.plot:
        _pyplot()  # fail before the slow part when matplotlib is missing
    pairs = _load_pairs_file(args.data, args.data_split, args.source_column, args.target_column, args.language_column)
    groups = _group_pairs(
        pairs,
        source_column=args.source_column,
        target_column=args.target_column,
        language_column=args.language_column,
        languages=args.languages,
        max_pairs_per_language=args.max_pairs_per_language,
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = _load_model_and_tokenizer(args.model_name_or_path, args.dtype, device)
    num_pairs = sum(len(sources) for sources, _ in groups.values())
    print(f"Probing {args.model_name_or_path} on {num_pairs} pairs in {len(groups)} language(s) ({device}).")
    result = _probe_groups(
        model,
        tokenizer,
        groups,
        batch_size=args.batch_size,
        max_length=args.max_length,
        show_progress=None,
        model_name=args.model_name_or_path,
    )
    written = [result.to_json(os.path.join(args.output_dir, "probe.json"))]
    if args.plot:
        written += result.plot(args.output_dir)
    layer = result.recommended_layer
    accuracy = result.retrieval_accuracy[_MEAN][result.layers.index(layer)]
    print()
    print("Retrieval accuracy of mean-pooled states per layer (0 = embeddings; * = recommended):")
    print(result.to_markdown())
    print()
    print(
        f"Recommended layer: {layer} of {result.layers[-1]} (mean retrieval accuracy {accuracy:.3f}); "
        f"use it with align_layer={layer}."
    )
    print("Wrote " + ", ".join(written))
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Training callback
# ---------------------------------------------------------------------------------------------------------------------


class LayerProbeCallback(TrainerCallback):
    r"""
    A [`~transformers.TrainerCallback`] that probes per-layer alignment on a fixed held-out pair set during training.

    It probes after every evaluation, or every `every_n_steps` optimizer steps when that is set. Every rank runs
    the probe (under DeepSpeed ZeRO-3 all ranks must take part in each forward); the main process saves
    `probe.json` and the plots into `{output_dir}/layer_probe/step-{global_step}/`. The scores reach every
    reporting integration (TensorBoard, W&B, ...) and `trainer.state.log_history` as

    - `probe/retrieval_layer_{L}`: mean retrieval accuracy over the languages at layer `L` (every layer, or `layers`);
    - `probe/retrieval_{language}`: the accuracy of each language at the trainer's `align_layer`, when the trainer has
      one (as [`AlignmentTrainer`] does);
    - `probe/runtime`: seconds this probe took on this rank, saving included (like `eval_runtime`).

    How they are logged, without touching the trainer's own log lines: after an evaluation, as a separate log entry
    at the same step; every `every_n_steps`, merged into the trainer's next regular training log line through TRL's
    `_metrics` store (a TRL trainer), or as a separate entry (a plain [`~transformers.Trainer`]). For the scores to
    appear at the step they were measured, make `every_n_steps` a multiple of `logging_steps`.

    Args:
        pairs (`datasets.Dataset` or `list[dict]`):
            Held-out parallel pairs, as for [`probe_layers`].
        tokenizer ([`~transformers.PreTrainedTokenizerBase`] or `None`, *optional*, defaults to `None`):
            Tokenizer; the trainer's `processing_class` when `None`.
        every_n_steps (`int` or `None`, *optional*, defaults to `None`):
            Probe every this many optimizer steps instead of after each evaluation.
        layers (`list[int]` or `None`, *optional*, defaults to `None`):
            Layers to log `probe/retrieval_layer_{L}` for; all layers when `None` (all layers are probed anyway,
            and saved in `probe.json`).
        trainer ([`~transformers.Trainer`] or `None`, *optional*, defaults to `None`):
            The trainer, needed to log. Can also be given later with [`~LayerProbeCallback.set_trainer`].
        batch_size (`int`, *optional*, defaults to `32`):
            Sentences per forward pass.
        max_length (`int`, *optional*, defaults to `128`):
            Maximum tokens per sentence.
        languages (`list[str]` or `None`, *optional*, defaults to `None`):
            Languages of `pairs` to probe; all when `None`.
        max_pairs_per_language (`int` or `None`, *optional*, defaults to `None`):
            Probe only the first this many pairs of each language.
        source_column (`str`, *optional*, defaults to `"parallel_source"`):
            Column with the source sentence.
        target_column (`str`, *optional*, defaults to `"parallel_target"`):
            Column with the target sentence.
        language_column (`str`, *optional*, defaults to `"language"`):
            Column with the language of each pair.
        save_plots (`bool`, *optional*, defaults to `True`):
            Save the heatmap and curve PNGs next to `probe.json` (needs matplotlib).

    Example:

    ```python
    >>> trainer = AlignmentTrainer(model=model, args=config, train_dataset=train, eval_dataset=dev)
    >>> trainer.add_callback(LayerProbeCallback(held_out_pairs, trainer=trainer, every_n_steps=50))
    >>> trainer.train()
    ```
    """

    def __init__(
        self,
        pairs,
        tokenizer=None,
        every_n_steps: int | None = None,
        layers: list[int] | None = None,
        *,
        trainer=None,
        batch_size: int = 32,
        max_length: int = 128,
        languages: list[str] | None = None,
        max_pairs_per_language: int | None = None,
        source_column: str = "parallel_source",
        target_column: str = "parallel_target",
        language_column: str = "language",
        save_plots: bool = True,
    ):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be a positive int, or None to probe at evaluation.")
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be positive, got {batch_size} and {max_length}.")
        if save_plots:
            _pyplot()  # fail at construction rather than in the middle of training
        self.groups = _group_pairs(
            pairs,
            source_column=source_column,
            target_column=target_column,
            language_column=language_column,
            languages=languages,
            max_pairs_per_language=max_pairs_per_language,
        )
        self.tokenizer = tokenizer
        self.every_n_steps = every_n_steps
        self.layers = None if layers is None else [int(layer) for layer in layers]
        self.trainer = trainer
        self.batch_size = batch_size
        self.max_length = max_length
        self.save_plots = save_plots
        self.history: list[tuple[int, ProbeResult]] = []  # (global_step, result) of every probe, on every rank
        self._last_probed_step: int | None = None

    def set_trainer(self, trainer) -> None:
        """
        Give the callback the trainer it logs through.

        Args:
            trainer ([`~transformers.Trainer`]):
                The trainer this callback is added to.
        """
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self._check_trainer()  # fail before the first training step rather than at the first probe

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_n_steps is None or state.global_step % self.every_n_steps != 0:
            return
        logs = self._probe(args, state, kwargs)
        if logs is None:
            return
        metrics = getattr(self.trainer, "_metrics", None)
        if isinstance(metrics, dict) and isinstance(metrics.get("train"), dict):
            # TRL trainers average `_metrics["train"]` into their next training log line and clear it.
            for key, value in logs.items():
                metrics["train"][key] = [value]
        else:
            # `Trainer.log` resets `control.should_log` (through `CallbackHandler.on_log`), which would drop this
            # step's regular log line: keep the flag as the earlier callbacks set it.
            should_log = control.should_log
            self.trainer.log(logs)
            control.should_log = should_log

    def on_evaluate(self, args, state, control, **kwargs):
        if self.every_n_steps is not None:
            return
        logs = self._probe(args, state, kwargs)
        if logs is not None:
            # The evaluation metrics are already logged when `on_evaluate` runs, and the step's training line before
            # them, so a separate entry at the same step loses nothing.
            self.trainer.log(logs)

    def _check_trainer(self) -> None:
        if self.trainer is None:
            raise ValueError(
                "LayerProbeCallback needs the trainer to log through: create it with "
                "LayerProbeCallback(pairs, trainer=trainer) and add it with trainer.add_callback(...), or call "
                "callback.set_trainer(trainer) before training."
            )

    def _probe(self, args, state, kwargs) -> dict[str, float] | None:
        if self._last_probed_step == state.global_step:
            return None  # for example evaluate() called twice at the same step
        self._check_trainer()
        model = getattr(self.trainer, "model", None)
        if model is None:
            model = kwargs.get("model")
        tokenizer = self.tokenizer
        if tokenizer is None:
            processing_class = kwargs.get("processing_class") or getattr(self.trainer, "processing_class", None)
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer is None:
            raise ValueError("LayerProbeCallback has no tokenizer: pass tokenizer=..., or give the trainer one.")
        start = time.perf_counter()
        result = _probe_groups(
            model, tokenizer, self.groups, batch_size=self.batch_size, max_length=self.max_length, show_progress=False
        )
        self._last_probed_step = state.global_step
        self.history.append((state.global_step, result))

        layers = result.layers if self.layers is None else self.layers
        outside = [layer for layer in layers if layer not in result.layers]
        if outside:
            raise ValueError(
                f"LayerProbeCallback(layers={self.layers}): {outside} are outside the model, whose layers are "
                f"0..{result.layers[-1]}."
            )
        mean = result.retrieval_accuracy[_MEAN]
        logs = {f"probe/retrieval_layer_{layer}": mean[result.layers.index(layer)] for layer in layers}
        align_layer = getattr(self.trainer, "align_layer", None)
        if isinstance(align_layer, int) and align_layer in result.layers:
            position = result.layers.index(align_layer)
            for language in result.languages:
                logs[f"probe/retrieval_{language}"] = result.retrieval_accuracy[language][position]

        if state.is_world_process_zero:
            directory = os.path.join(args.output_dir, "layer_probe", f"step-{state.global_step}")
            result.to_json(os.path.join(directory, "probe.json"))
            if self.save_plots:
                result.plot(directory)
        logs["probe/runtime"] = round(time.perf_counter() - start, 4)
        return logs
