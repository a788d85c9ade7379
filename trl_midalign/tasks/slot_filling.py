"""Slot filling on MASSIVE as generation: the model answers a voice-assistant request with its slots.

The answer is `"slot: span; slot: span"` (or `"None"`), scored with span-level micro F1 in the manner of seqeval plus
exact match of the whole slot set. Alignment pairs come from MASSIVE itself: utterances of different locales are
parallel through their `id`.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from datasets import Dataset, concatenate_datasets

from .arguments import RecipeArguments
from .loading import as_task_row, pairs_from_lists, require_columns
from .metrics import exact_match, normalize_text, span_f1


NAME = "slot_filling"
MAIN_METRIC = "slot_f1"
NO_SLOTS = "None"
# The 52 locales of MASSIVE 1.1
MASSIVE_LOCALES = (
    "af-ZA am-ET ar-SA az-AZ bn-BD ca-ES cy-GB da-DK de-DE el-GR en-US es-ES fa-IR fi-FI fr-FR he-IL hi-IN hu-HU hy-AM "
    "id-ID is-IS it-IT ja-JP jv-ID ka-GE km-KH kn-IN ko-KR lv-LV ml-IN mn-MN ms-MY my-MM nb-NO nl-NL pl-PL pt-PT ro-RO "
    "ru-RU sl-SL sq-AL sv-SE sw-KE ta-IN te-IN th-TH tl-PH tr-TR ur-PK vi-VN zh-CN zh-TW"
).split()
PROMPT = (
    'List the slots of this voice-assistant request as "slot: span" pairs separated by ";", or answer "None" if it '
    "has no slot.\nRequest: {utterance}"
)
COLUMNS = ("utt", "annot_utt")
COLUMNS_FIX = "Use MASSIVE's fields (utt: the request, annot_utt: it with [slot : span] brackets)."
_SLOT = re.compile(r"\[\s*([^:\]]+?)\s*:\s*([^\]]*?)\s*\]")


@dataclass
class SlotFillingArguments(RecipeArguments):
    """
    The arguments of `recipes/slot_filling.py`: those of [`~trl_midalign.tasks.arguments.RecipeArguments`] with
    MASSIVE's defaults (per-locale Hub configurations, the `locale` column, en-US as the English side of the pairs).
    """

    dataset_name: str | None = field(
        default="AmazonScience/massive",
        metadata={"help": "MASSIVE on the Hub, or a local file/folder with the fields locale, utt, annot_utt, id."},
    )
    dataset_config: str | None = field(
        default="{lang}", metadata={"help": "Hub configuration; '{lang}' loads one MASSIVE locale at a time."}
    )
    language_column: str = field(default="locale", metadata={"help": "Column with each row's locale."})
    train_languages: list[str] = field(
        default_factory=lambda: ["en-US"], metadata={"help": "MASSIVE locales of the task training data."}
    )
    alignment_pivot_language: str = field(
        default="en-US", metadata={"help": "Locale of the English side of the alignment pairs."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum generated tokens per evaluation example."})


def slots_of(annotated: str) -> list[tuple[str, str]]:
    """
    The `(slot, span)` pairs of a MASSIVE `annot_utt`.

    Example:

    ```python
    >>> slots_of("wake me up at [time : five am] [date : this week]")
    [('time', 'five am'), ('date', 'this week')]
    ```
    """
    return [(slot, span) for slot, span in _SLOT.findall(annotated)]


def format_slots(slots: Sequence[tuple[str, str]]) -> str:
    """
    Write slots as the target string of the slot-filling task.

    Args:
        slots (`Sequence[tuple[str, str]]`):
            `(slot type, span text)` pairs in utterance order.

    Returns:
        `str`: `"type: span; type: span"`, or `"None"` when there is no slot.

    Example:

    ```python
    >>> format_slots([("time", "five am"), ("date", "this week")])
    'time: five am; date: this week'
    >>> format_slots([])
    'None'
    ```
    """
    return "; ".join(f"{slot}: {span}" for slot, span in slots) if slots else NO_SLOTS


def parse_slots(text: str) -> list[tuple[str, str]]:
    """
    Read generated slots back, the inverse of [`format_slots`].

    Pieces are separated by `;`, and each piece is split at its first `:` into a slot type and a span. Type and span
    are lower-cased with whitespace collapsed. `"None"`, an empty answer and pieces without a `:` or with an empty
    side yield no slot.

    Args:
        text (`str`):
            Generated answer.

    Returns:
        `list[tuple[str, str]]`: `(slot type, span text)` pairs.

    Example:

    ```python
    >>> parse_slots("time: Five  AM; date: this week")
    [('time', 'five am'), ('date', 'this week')]
    >>> parse_slots("None")
    []
    ```
    """
    slots = []
    for piece in str(text).strip().split(";"):
        slot, sep, span = piece.partition(":")
        slot, span = normalize_text(slot), normalize_text(span)
        if sep and slot and span:
            slots.append((slot, span))
    return slots


def slot_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """
    Slot-filling scores of generated answers against reference answers, both in the [`format_slots`] format.

    Args:
        predictions (`Sequence[str]`):
            Generated answers.
        references (`Sequence[str]`):
            Reference answers.

    Returns:
        `dict[str, float]`: `slot_f1`, `slot_precision`, `slot_recall` (span-level micro scores, see
        [`~trl_midalign.tasks.metrics.span_f1`]) and `exact_match` (fraction of examples whose whole set of slots is
        right, `"None"` included).
    """
    predicted = [parse_slots(p) for p in predictions]
    gold = [parse_slots(r) for r in references]
    scores = span_f1(predicted, gold)
    return {
        "slot_f1": scores["f1"],
        "slot_precision": scores["precision"],
        "slot_recall": scores["recall"],
        "exact_match": exact_match(predicted, gold),
    }


def score(predictions: Sequence[str], references: Sequence[str], language: str) -> dict[str, float]:
    """The scores of one language's answers (the same metrics for every locale): see [`slot_scores`]."""
    return slot_scores(predictions, references)


def examples(rows: Dataset, language_column: str, conversational: bool) -> list[dict]:
    """Evaluation examples (`language`, `prompt`, `reference`) of MASSIVE rows."""
    require_columns(rows, COLUMNS, "The evaluation data", COLUMNS_FIX)
    return [
        {
            "language": row[language_column],
            "prompt": as_task_row(PROMPT.format(utterance=row["utt"]), "", conversational)["prompt"],
            "reference": format_slots(slots_of(row["annot_utt"])),
        }
        for row in rows
    ]


def train_dataset(rows: Dataset, language_column: str, conversational: bool) -> Dataset:
    """The task rows of MASSIVE rows: TRL prompt-completion rows with a `language` column."""
    require_columns(rows, COLUMNS, "The training data", COLUMNS_FIX)
    return Dataset.from_list(
        [
            {
                **as_task_row(
                    PROMPT.format(utterance=row["utt"]), format_slots(slots_of(row["annot_utt"])), conversational
                ),
                "language": row[language_column],
            }
            for row in rows
        ]
    )


def massive_pairs(
    rows: Dataset,
    languages: Sequence[str],
    pivot: str,
    language_column: str,
    max_pairs: int | None = None,
    text_column: str = "utt",
) -> Dataset:
    """
    Alignment pairs from MASSIVE itself: each utterance of an alignment locale with the utterance of the same `id` in
    the `pivot` locale (en-US).

    Args:
        rows ([`~datasets.Dataset`]):
            MASSIVE rows of the alignment locales and of the pivot.
        languages (`Sequence[str]`):
            The alignment locales.
        pivot (`str`):
            The English locale.
        language_column (`str`):
            Column with each row's locale.
        max_pairs (`int`, *optional*):
            Keep at most this many pairs per locale.
        text_column (`str`, *optional*, defaults to `"utt"`):
            Column with the utterance.

    Returns:
        [`~datasets.Dataset`]: columns `parallel_source`, `parallel_target` and `language`.
    """
    require_columns(
        rows,
        ["id", text_column],
        "The MASSIVE data",
        "MASSIVE rows are parallel across locales through their 'id'; without it, give --alignment_dataset_name.",
    )
    texts = rows[text_column]
    english = {i: u for i, u, lang in zip(rows["id"], texts, rows[language_column]) if lang == pivot}
    parts = []
    for language in languages:
        pairs = [
            (utt, english[i])
            for i, utt, lang in zip(rows["id"], texts, rows[language_column])
            if lang == language and i in english
        ]
        if not pairs:
            raise ValueError(
                f"No {language} utterance shares an id with a {pivot} one; these locales cannot be paired."
            )
        parts.append(pairs_from_lists([s for s, _ in pairs], [t for _, t in pairs], language, max_pairs))
    return concatenate_datasets(parts)
