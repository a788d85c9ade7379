"""Span-level metrics shared by the tasks whose answers are sets of typed spans (slots, named entities)."""

from collections import Counter
from collections.abc import Sequence
from typing import Any


def normalize_text(text: str) -> str:
    """Lower-case `text` and collapse its whitespace, the comparison key of spans and answers."""
    return " ".join(str(text).lower().split())


def span_f1(predicted: Sequence[Sequence[tuple[str, str]]], gold: Sequence[Sequence[tuple[str, str]]]) -> dict:
    """
    Micro-averaged precision, recall and F1 of typed spans, counted over a whole corpus.

    Each example contributes the multiset intersection of its predicted and gold `(type, text)` spans as true
    positives. This is the span-level metric of seqeval (a span counts only when its type and its whole extent are
    right), with the span's text standing in for its token offsets, since a generated answer has no offsets. With no
    true positive the scores are 0, as in seqeval.

    Args:
        predicted (`Sequence[Sequence[tuple[str, str]]]`):
            Predicted `(type, text)` spans of each example.
        gold (`Sequence[Sequence[tuple[str, str]]]`):
            Gold `(type, text)` spans of each example, in the same order.

    Returns:
        `dict`: `precision`, `recall`, `f1` (floats in [0, 1]) and the counts `true_positives`, `num_predicted`,
        `num_gold`.
    """
    if len(predicted) != len(gold):
        raise ValueError(f"Got {len(predicted)} predictions for {len(gold)} references; they must pair up one to one.")
    true_positives = num_predicted = num_gold = 0
    for pred_spans, gold_spans in zip(predicted, gold):
        pred_counts = Counter((t, normalize_text(s)) for t, s in pred_spans)
        gold_counts = Counter((t, normalize_text(s)) for t, s in gold_spans)
        true_positives += sum((pred_counts & gold_counts).values())
        num_predicted += sum(pred_counts.values())
        num_gold += sum(gold_counts.values())
    precision = true_positives / num_predicted if num_predicted else 0.0
    recall = true_positives / num_gold if num_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if true_positives else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "true_positives": true_positives,
        "num_predicted": num_predicted,
        "num_gold": num_gold,
    }


def exact_match(predicted: Sequence[Any], gold: Sequence[Any]) -> float:
    """
    Fraction of examples whose prediction equals the reference.

    Strings are compared after lower-casing and collapsing whitespace; lists of spans are compared as multisets.

    Args:
        predicted (`Sequence`):
            Predictions (strings or lists of spans).
        gold (`Sequence`):
            References, in the same order.

    Returns:
        `float`: in [0, 1]; 0 for an empty input.
    """
    if len(predicted) != len(gold):
        raise ValueError(f"Got {len(predicted)} predictions for {len(gold)} references; they must pair up one to one.")

    def key(value):
        if isinstance(value, str):
            return normalize_text(value)
        return Counter((t, normalize_text(s)) for t, s in value)

    hits = sum(key(p) == key(g) for p, g in zip(predicted, gold))
    return hits / len(gold) if gold else 0.0
