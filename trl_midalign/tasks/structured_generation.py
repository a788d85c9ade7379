"""Named entities generated as JSON (Universal NER style), scored with entity-level micro F1 and the valid-JSON rate.

The model reads a sentence and answers with `{"person": [...], "organization": [...], "location": [...]}`. Data:
Universal NER rows (`tokens` and BIO `ner_tags`, as class labels or strings), one Hub configuration per treebank
(`en_ewt`, `de_pud`, ...), or local rows with a language column. Universal NER has no parallel sentences: alignment
pairs come from another dataset or from `parallel_source`/`parallel_target` columns of the task rows.
"""

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from datasets import ClassLabel, Dataset

from . import languages
from .arguments import RecipeArguments
from .languages import iso_code
from .loading import PAIR_COLUMNS, as_task_row, pairs_from_rows, require_columns
from .metrics import span_f1


NAME = "structured_generation"
MAIN_METRIC = "entity_f1"
ENTITY_TYPES = ("person", "organization", "location")
UNER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
TYPE_NAMES = {"PER": "person", "ORG": "organization", "LOC": "location"}
PROMPT = (
    'Find the named entities in the text. Answer with a JSON object with the keys "person", "organization" and '
    '"location", each a list of the entity strings as they appear in the text.\nText: {text}'
)
COLUMNS = ("tokens", "ner_tags")
COLUMNS_FIX = "Give each row 'tokens' (words) and 'ner_tags' (BIO tags such as B-PER, as strings or class labels)."
# Scripts written without spaces between words: their tokens are joined without a space
_NO_SPACE = {"zh", "ja", "th", "lo", "km", "my", "yue"}


@dataclass
class StructuredGenerationArguments(RecipeArguments):
    """
    The arguments of `recipes/structured_generation.py`: those of [`~trl_midalign.tasks.arguments.RecipeArguments`],
    where languages are Universal NER treebanks (`en_ewt`, `de_pud`, ...) or plain language codes in local data.

    Parameters:
        tag_names (`list[str]`, *optional*):
            Names of integer `ner_tags` in local data without class-label metadata; defaults to Universal NER's.
    """

    dataset_name: str | None = field(
        default="universalner/universal_ner",
        metadata={
            "help": "Universal NER on the Hub, or a local file/folder with tokens, ner_tags and a language column."
        },
    )
    dataset_config: str | None = field(
        default="{lang}", metadata={"help": "Hub configuration; '{lang}' loads one treebank at a time."}
    )
    train_languages: list[str] | None = field(
        default=None,
        metadata={
            "help": "Treebanks (or language codes) of the task data; default: en_ewt on the Hub, the English ones "
            "(en, en_*) of local data."
        },
    )
    tag_names: list[str] | None = field(
        default=None, metadata={"help": "Names of integer ner_tags without label metadata (default: Universal NER's)."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Maximum generated tokens per evaluation example."})


def entities_from_bio(tokens: list[str], tags: list[str], joiner: str = " ") -> list[tuple[str, str]]:
    """
    `(type, text)` entities of a BIO-tagged sentence; an `I-` tag without a matching `B-` starts an entity, as in
    seqeval's default mode. Types are mapped to `person`/`organization`/`location`; other types are dropped.

    Example:

    ```python
    >>> entities_from_bio(["Ada", "Lovelace", "visited", "London"], ["B-PER", "I-PER", "O", "B-LOC"])
    [('person', 'Ada Lovelace'), ('location', 'London')]
    ```
    """
    entities, current, kind = [], [], None
    for token, tag in [*zip(tokens, tags), ("", "O")]:
        prefix, _, label = tag.partition("-")
        if current and (prefix != "I" or label != kind):
            if kind in TYPE_NAMES:
                entities.append((TYPE_NAMES[kind], joiner.join(current)))
            current, kind = [], None
        if prefix in ("B", "I") and not current:
            current, kind = [token], label
        elif prefix == "I":
            current.append(token)
    return entities


def format_entities(entities: Sequence[tuple[str, str]], types: Sequence[str] = ENTITY_TYPES) -> str:
    """
    Write entities as the JSON target of the structured-generation task.

    Args:
        entities (`Sequence[tuple[str, str]]`):
            `(entity type, text)` pairs in sentence order.
        types (`Sequence[str]`, *optional*, defaults to `("person", "organization", "location")`):
            Keys of the JSON object, each present (with an empty list when the sentence has none of that type).

    Returns:
        `str`: a compact JSON object mapping each type to the list of its entity strings.

    Example:

    ```python
    >>> format_entities([("person", "Ada Lovelace"), ("location", "London")])
    '{"person": ["Ada Lovelace"], "organization": [], "location": ["London"]}'
    ```
    """
    unknown = sorted({t for t, _ in entities} - set(types))
    if unknown:
        raise ValueError(f"Entity types {unknown} are not among the JSON keys {list(types)}; add them to `types`.")
    return json.dumps({t: [text for kind, text in entities if kind == t] for t in types}, ensure_ascii=False)


def parse_entities(text: str) -> list[tuple[str, str]] | None:
    """
    Read a generated JSON answer back into `(entity type, text)` pairs.

    The answer is valid when it is a JSON object (optionally inside a ```json fence) whose values are lists of
    strings. Types are lower-cased.

    Args:
        text (`str`):
            Generated answer.

    Returns:
        `list[tuple[str, str]] | None`: the entities, or `None` when the answer is not valid JSON of that shape.

    Example:

    ```python
    >>> parse_entities('{"person": ["Ada Lovelace"], "location": []}')
    [('person', 'Ada Lovelace')]
    >>> parse_entities('{"person": "Ada"') is None
    True
    ```
    """
    text = str(text).strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    entities = []
    for kind, items in value.items():
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            return None
        entities.extend((str(kind).strip().lower(), item) for item in items)
    return entities


def entity_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """
    Structured-generation scores of generated JSON answers against reference answers (see [`format_entities`]).

    An invalid answer counts as predicting no entity, so it costs recall, and lowers `valid_json_rate`.

    Args:
        predictions (`Sequence[str]`):
            Generated answers.
        references (`Sequence[str]`):
            Reference answers (valid JSON).

    Returns:
        `dict[str, float]`: `entity_f1`, `entity_precision`, `entity_recall` (micro, see
        [`~trl_midalign.tasks.metrics.span_f1`]) and `valid_json_rate` (fraction of answers that parse).
    """
    gold = []
    for i, reference in enumerate(references):
        parsed = parse_entities(reference)
        if parsed is None:
            raise ValueError(f"Reference {i} is not valid entity JSON: {reference!r}. Write it with format_entities.")
        gold.append(parsed)
    parsed_predictions = [parse_entities(p) for p in predictions]
    scores = span_f1([p or [] for p in parsed_predictions], gold)
    valid = sum(p is not None for p in parsed_predictions)
    return {
        "entity_f1": scores["f1"],
        "entity_precision": scores["precision"],
        "entity_recall": scores["recall"],
        "valid_json_rate": valid / len(predictions) if predictions else 0.0,
    }


def score(predictions: Sequence[str], references: Sequence[str], language: str) -> dict[str, float]:
    """The scores of one language's answers (the same metrics for every language): see [`entity_scores`]."""
    return entity_scores(predictions, references)


def sentences(rows: Dataset, language_column: str, tag_names: Sequence[str] | None = None) -> list[dict]:
    """
    `language`, `text` and the JSON `answer` of each Universal NER row.

    Args:
        rows ([`~datasets.Dataset`]):
            Rows with `tokens`, BIO `ner_tags` (class labels, strings, or integers) and a language column.
        language_column (`str`):
            Column with each row's language or treebank.
        tag_names (`Sequence[str]`, *optional*):
            Names of integer `ner_tags` without class-label metadata; defaults to Universal NER's.
    """
    inner = getattr(rows.features["ner_tags"], "feature", None)
    names = inner.names if isinstance(inner, ClassLabel) else (tag_names or UNER_LABELS)
    result = []
    for row in rows:
        tags = [names[t] if isinstance(t, int) else str(t) for t in row["ner_tags"]]
        joiner = "" if iso_code(row[language_column]) in _NO_SPACE else " "
        result.append(
            {
                "language": row[language_column],
                "text": joiner.join(row["tokens"]),
                "answer": format_entities(entities_from_bio(row["tokens"], tags, joiner)),
            }
        )
    return result


def english_languages(rows: Dataset, language_column: str, pivot: str) -> list[str]:
    """The English languages or treebanks (`en`, `en_ewt`, ...) of local rows, the default task languages."""
    found = sorted(lang for lang in set(rows[language_column]) if iso_code(lang) == iso_code(pivot))
    if not found:
        raise ValueError("The training data has no English rows; name the task languages with --train_languages.")
    return found


def examples(
    rows: Dataset, language_column: str, conversational: bool, tag_names: Sequence[str] | None = None
) -> list[dict]:
    """Evaluation examples (`language`, `prompt`, `reference`) of Universal NER rows (see [`sentences`])."""
    require_columns(rows, COLUMNS, "The evaluation data", COLUMNS_FIX)
    return [
        {
            "language": row["language"],
            "prompt": as_task_row(PROMPT.format(text=row["text"]), "", conversational)["prompt"],
            "reference": row["answer"],
        }
        for row in sentences(rows, language_column, tag_names)
    ]


def train_dataset(
    rows: Dataset, language_column: str, conversational: bool, tag_names: Sequence[str] | None = None
) -> Dataset:
    """The task rows of Universal NER rows: TRL prompt-completion rows with a `language` column."""
    require_columns(rows, COLUMNS, "The training data", COLUMNS_FIX)
    return Dataset.from_list(
        [
            {
                **as_task_row(PROMPT.format(text=row["text"]), row["answer"], conversational),
                "language": row["language"],
            }
            for row in sentences(rows, language_column, tag_names)
        ]
    )


def language_groups(
    eval_languages: Sequence[str], train_languages: Sequence[str], alignment_languages: Sequence[str]
) -> dict[str, list[str]]:
    """
    The report's language groups, with treebanks counted by their language: `en_pud` is a task language when `en_ewt`
    is, `de_pud` an aligned one with `de` pairs.
    """
    trained = {iso_code(t) for t in train_languages}
    aligned = {iso_code(a) for a in alignment_languages}
    return languages.language_groups(
        eval_languages,
        [lang for lang in eval_languages if iso_code(lang) in trained],
        [lang for lang in eval_languages if iso_code(lang) in aligned],
    )


def pairs_from_task_rows(
    rows: Dataset, languages: Sequence[str], language_column: str, max_pairs: int | None
) -> Dataset:
    """
    Alignment pairs carried by the task rows (columns `parallel_source`/`parallel_target`), since Universal NER itself
    has no parallel sentences; a clear error with the ways out when the rows have no such columns.
    """
    if not all(column in rows.column_names for column in PAIR_COLUMNS):
        raise ValueError(
            "Universal NER has no parallel sentences: give alignment pairs with --alignment_dataset_name "
            "(columns parallel_source/parallel_target or translation dicts), or add parallel_source/"
            "parallel_target columns to the training rows, or run the baseline with --alignment false."
        )
    return pairs_from_rows(rows, languages, language_column, max_pairs)
