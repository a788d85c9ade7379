"""The transfer study's data builder: task data with gold labels in every language, from the inline markup of the LibreOffice help.

The translated help pages keep the English pages' inline markup (`<span class="emph">`, `"menuitem"`, `"literal"`,
...), so each paragraph gives, in every language, a plain text and its labelled spans. From these, this module writes
the tasks in the exact input formats of the recipes, so that `recipes/*.py` run unchanged on them:

- **classification**: the application a paragraph's help page belongs to (its path: `text/swriter/...` is Writer,
  see [`APPLICATION_LABELS`]), the same label in every language, as rows `id`, `text`, `label`, `language`;
- **slot filling**: MASSIVE rows (`id`, `locale`, `partition`, `utt`, `annot_utt` with `[class : span]` brackets);
- **translation**: rows with a `translation` dict `{language: paragraph, "en": English paragraph}`;
- **structured generation**: Universal NER rows (`language`, `tokens`, BIO `ner_tags`), see [`STRUCTURED_TAGS`].

Paragraphs are split *by help page* (the page path before `#`) into disjoint `train`, `alignment` and `eval` pages
with a fixed seed (the same split for every language), so no evaluated paragraph was seen, in any language, during
training; with `dev_fraction`, a share of the train pages becomes `dev` pages (English development rows, for the best
checkpoint). The task training data is English (translation: the directions of `train_languages`); the alignment pairs
(non-English, English) come from the alignment pages; evaluation uses the eval pages.
"""

import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from trl_midalign._logging import get_logger
from trl_midalign.demo.cache import temporary_sibling
from trl_midalign.demo.libreoffice import (
    LIBREOFFICE_LANGUAGES,
    SPAN_CLASSES,
    _has_markup,
    _keep_pair,
    _normalize_language,
    help_markup,
)


logger = get_logger(__name__)

Task = Literal["classification", "slot_filling", "translation", "structured_generation"]
TASKS: tuple[str, ...] = ("classification", "slot_filling", "translation", "structured_generation")
# Page splits, in the order in which an English text seen earlier drops a later paragraph with the same text
SPLITS: tuple[str, ...] = ("train", "dev", "alignment", "eval")
# Classification: the label of a paragraph is the application of its help page (`text/<application>/...`). Draw's
# pages (48, about 900 English paragraphs) are merged with Impress's: the two applications share their drawing
# functions and much of their help. Dropped: the pages of `text/shared` (832 pages, about 16,700 paragraphs), which
# describe what all applications have in common, so their text does not name one application; and Base's
# (`text/sdatabase`, 85 pages), whose eval-page paragraphs are translated (with the filters' agreement) in few
# languages: 1 row in ja, km, ko, pt and zh-cn, none in hi (seed 0, 120 characters), so a language's score would
# depend on whether it has the class. Pages outside `text/` have no label either.
APPLICATION_LABELS = {
    "swriter": "Writer",
    "scalc": "Calc",
    "simpress": "Impress and Draw",
    "sdraw": "Impress and Draw",
    "sbasic": "Basic",
    "smath": "Math",
    "schart": "Chart",
}
ENGLISH = "en"
# The structured-generation recipe answers with Universal NER's three keys (person, organization, location); its
# rows carry these tags for the three most frequent span classes (other spans are tagged O). The JSON keys are
# therefore names for help markup: "location" = a menu path, "organization" = an emphasised UI term, "person" = a
# literal value.
STRUCTURED_TAGS = {"menuitem": "LOC", "emph": "ORG", "literal": "PER"}
# Scripts written without spaces (as the structured-generation task joins their tokens without a space)
_NO_SPACE = {"zh", "ja", "th", "lo", "km", "my", "yue"}
_WORDS = re.compile(r"\S+\s*")


def page_of(paragraph_id: str) -> str:
    """The help page of a paragraph id: `"text/scalc/01/x.html#par_id1"` -> `"text/scalc/01/x.html"`."""
    return paragraph_id.partition("#")[0]


def application_of(paragraph_id: str) -> str | None:
    """
    The classification label of a paragraph: the application of its help page ([`APPLICATION_LABELS`]), `None` for a
    page of no single application (`text/shared`, pages outside `text/`).

    Example:

    ```python
    >>> application_of("text/scalc/01/04060106.html#par_id1"), application_of("text/shared/01/about.html#x")
    ('Calc', None)
    ```
    """
    parts = page_of(paragraph_id).split("/")
    return APPLICATION_LABELS.get(parts[1]) if len(parts) > 2 and parts[0] == "text" else None


def _hash_fraction(seed: int, page: str, salt: str = "") -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{salt}{page}".encode()).digest()[:8], "little") / 2**64


def page_split(
    page: str, seed: int = 0, fractions: Sequence[float] = (0.6, 0.2, 0.2), dev_fraction: float = 0.0
) -> str:
    """
    The split (`"train"`, `"dev"`, `"alignment"` or `"eval"`) of a help page: a hash of `seed` and the page path
    compared with the cumulative `fractions` (train, alignment, eval), so the split of a page never depends on the
    languages or on the other pages. A second hash moves `dev_fraction` of the train pages to `"dev"`, so the other
    splits stay the same whatever `dev_fraction` is.

    Example:

    ```python
    >>> page_split("text/scalc/01/04060106.html", seed=0) in ("train", "alignment", "eval")
    True
    ```
    """
    value = _hash_fraction(seed, page)
    split, total = "eval", 0.0
    for name, fraction in zip(("train", "alignment", "eval"), fractions):
        total += fraction
        if value < total:
            split = name
            break
    if split == "train" and _hash_fraction(seed, page, "dev:") < dev_fraction:
        return "dev"
    return split


def _language_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def task_language_code(language: str, task: Task) -> str:
    """
    The code a recipe expects for a help language: a MASSIVE locale for slot filling (`"ja"` -> `"ja-JP"`,
    `"en"` -> `"en-US"`), an ISO 639-1 code otherwise (`"zh-cn"` -> `"zh"`, `"pt-br"` -> `"pt"`).

    Raises:
        ValueError: For slot filling, a help language that has no MASSIVE locale.
    """
    from trl_midalign.tasks.slot_filling import MASSIVE_LOCALES

    code = ENGLISH if language in (ENGLISH, "en-us") else _normalize_language(language)
    if task != "slot_filling":
        return code.split("-")[0]
    special = {"en": "en-US", "zh-cn": "zh-CN", "zh-tw": "zh-TW"}
    if code in special:
        return special[code]
    locales = [locale for locale in MASSIVE_LOCALES if locale.split("-")[0] == code and not code.startswith("zh")]
    if not locales:
        usable = sorted(
            c for c in LIBREOFFICE_LANGUAGES if c in special or any(loc[:2] == c for loc in MASSIVE_LOCALES)
        )
        raise ValueError(
            f"The slot filling recipe reads MASSIVE locales, and help language {language!r} has none. Help languages "
            f"with a MASSIVE locale: {', '.join(usable)}."
        )
    return locales[0]


def _usable_english(record: dict, min_chars: int, max_chars: int) -> bool:
    text = record["text"]
    if not min_chars <= len(text) <= max_chars or _has_markup(text) or "[" in text or "]" in text:
        return False
    return all(";" not in text[start:end] for start, end, _ in record["spans"])


def _classes(record: dict) -> Counter:
    return Counter(name for _, _, name in record["spans"])


@dataclass
class TaskParagraphs:
    """
    The paragraphs of the LibreOffice tasks, split by help page, as [`libreoffice_task_paragraphs`] returns them.

    Each paragraph is `{"id", "text", "spans": [[start, end, class], ...], "english": {"text", "spans"}}` (English
    ones have no `"english"`).

    Args:
        train (`dict[str, list[dict]]`):
            Task training paragraphs of the train pages per language (`"en"`, and any translation train language).
        dev (`dict[str, list[dict]]`):
            Development paragraphs of the dev pages per train language (empty without `dev_fraction`).
        alignment (`dict[str, list[dict]]`):
            Paragraphs of the alignment pages per alignment language (their English side is the pair's target).
        eval (`dict[str, list[dict]]`):
            Evaluation paragraphs of the eval pages per evaluated language (`"en"` included when asked for).
        counts (`dict[str, dict[str, int]]`):
            Usable paragraphs per language and split before any cap (`"en"`: English paragraphs), and
            `<split>_with_spans`: those with at least one span.
        seed (`int`):
            Seed of the page split and of the shuffles.
    """

    train: dict[str, list[dict]] = field(default_factory=dict)
    dev: dict[str, list[dict]] = field(default_factory=dict)
    alignment: dict[str, list[dict]] = field(default_factory=dict)
    eval: dict[str, list[dict]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    seed: int = 0


def _cap(
    paragraphs: list[dict], limit: int | None, no_span_fraction: float, seed: int, name: str, balance: bool = False
) -> list[dict]:
    """Shuffle (stable for `seed` and `name`), keep at most `no_span_fraction` of paragraphs without spans, cap.

    With `balance`, the shuffled paragraphs are dealt out label by label (round robin over the sorted labels), so a
    cap keeps the labels as even as the paragraphs allow."""
    paragraphs = sorted(paragraphs, key=lambda p: p["id"])
    random.Random(_language_seed(seed, name)).shuffle(paragraphs)
    with_spans = [p for p in paragraphs if p["spans"]]
    without = [p for p in paragraphs if not p["spans"]]
    if no_span_fraction < 1.0:
        allowed = int(len(with_spans) * no_span_fraction / (1.0 - no_span_fraction))
        without = without[:allowed]
    # Shuffled again: the kept paragraphs without spans are the first ones of the shuffle, so the cap would take
    # mostly them
    paragraphs = [*with_spans, *without]
    random.Random(_language_seed(seed, name + ":kept")).shuffle(paragraphs)
    if balance:
        by_label: dict[str, list[dict]] = {}
        for paragraph in paragraphs:
            by_label.setdefault(paragraph["label"], []).append(paragraph)
        queues = [by_label[label] for label in sorted(by_label)]
        paragraphs = [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]
    return paragraphs[:limit]


def libreoffice_task_paragraphs(
    eval_languages: Sequence[str],
    alignment_languages: Sequence[str] = (),
    train_languages: Sequence[str] = (ENGLISH,),
    *,
    seed: int = 0,
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    min_chars: int = 10,
    max_chars: int = 160,
    max_overlap: float = 0.5,
    no_span_fraction: float = 0.25,
    max_train: int | None = None,
    max_alignment: int | None = None,
    max_eval: int | None = None,
    dev_fraction: float = 0.0,
    max_dev: int | None = None,
    by_application: bool = False,
    min_paragraphs: int = 10,
    drop_short_languages: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> TaskParagraphs:
    """
    Paragraphs with their inline spans from the LibreOffice help, filtered and split by page for the three tasks.

    A translated paragraph is usable when (1) its English original (same id) is usable: `min_chars` to `max_chars`
    characters, no leftover markup, placeholder or URL, no `[`/`]` (MASSIVE's brackets) and no `;` inside a span (the
    slot separator); (2) the pair passes the filter of [`libreoffice_parallel_pairs`] (not untranslated, at most
    `max_overlap` of the English words copied; the translated side may be twice as long); (3) its markup matches the
    English one in kind and number (the same multiset of span classes). A paragraph whose English text already
    appeared on a page of an earlier split (train, then alignment, then eval) or earlier in its own split is dropped,
    so the same sentence cannot be trained on and evaluated.

    Args:
        eval_languages (`Sequence[str]`):
            Languages evaluated (help language codes, e.g. `["ja", "hi", "km"]`; `"en"` evaluates English too).
        alignment_languages (`Sequence[str]`, *optional*):
            Languages whose alignment pairs (from the alignment pages) are returned.
        train_languages (`Sequence[str]`, *optional*, defaults to `("en",)`):
            Languages of the task training paragraphs (translation needs a non-English one, e.g. `["de"]`).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the page split ([`page_split`]) and of the shuffles.
        split_fractions (`Sequence[float]`, *optional*, defaults to `(0.6, 0.2, 0.2)`):
            Fractions of the pages in train, alignment and eval.
        min_chars, max_chars (`int`, *optional*, default to `10` and `160`):
            Length range of the English paragraph in characters (keep it short for a small model on CPU).
        max_overlap (`float`, *optional*, defaults to `0.5`):
            Largest fraction of English words copied unchanged into the translation.
        no_span_fraction (`float`, *optional*, defaults to `0.25`):
            Largest fraction of paragraphs without any span in each returned list (they answer `None`); `1.0` keeps
            them all.
        max_train, max_alignment, max_eval (`int`, *optional*):
            Caps on the paragraphs per language of each split (after a seeded shuffle).
        dev_fraction (`float`, *optional*, defaults to `0.0`):
            Share of the train pages held out as dev pages: development paragraphs of the train languages
            (`TaskParagraphs.dev`), for choosing the checkpoint. `0.0`: no dev split.
        max_dev (`int`, *optional*):
            Cap on the dev paragraphs per train language.
        by_application (`bool`, *optional*, defaults to `False`):
            Classification: keep only paragraphs of application pages, each with its `"label"`
            ([`application_of`]), and cap every split label by label (as even as the paragraphs allow).
        min_paragraphs (`int`, *optional*, defaults to `10`):
            Fewest usable paragraphs a language needs in each split it is used in.
        drop_short_languages (`bool`, *optional*, defaults to `False`):
            Drop (with a warning) an evaluated or alignment language below `min_paragraphs` instead of raising.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Cache directory, see [`cache_root`].

    Returns:
        [`TaskParagraphs`]

    Raises:
        ValueError: A language without a help package (naming the available ones), a split with fewer than
            `min_paragraphs` usable paragraphs (naming language, split, count and the option to change), arguments
            out of range.
    """
    if not 0 < min_chars <= max_chars:
        raise ValueError(f"Need 0 < `min_chars` <= `max_chars`, got min_chars={min_chars}, max_chars={max_chars}.")
    if len(split_fractions) != 3 or any(f <= 0 for f in split_fractions) or abs(sum(split_fractions) - 1) > 1e-6:
        raise ValueError(f"`split_fractions` must be three positive fractions summing to 1, got {split_fractions}.")
    if not 0.0 <= no_span_fraction <= 1.0:
        raise ValueError(f"`no_span_fraction` must be in [0, 1], got {no_span_fraction}.")
    if min_paragraphs < 1:
        raise ValueError(f"`min_paragraphs` must be at least 1, got {min_paragraphs}.")
    if not 0.0 <= dev_fraction < 1.0:
        raise ValueError(f"`dev_fraction` must be in [0, 1), got {dev_fraction}.")

    def code(language: str) -> str:
        return ENGLISH if str(language).strip().lower() in (ENGLISH, "en-us") else _normalize_language(language)

    eval_codes = list(dict.fromkeys(code(lang) for lang in eval_languages))
    alignment_codes = list(dict.fromkeys(code(lang) for lang in alignment_languages))
    train_codes = list(dict.fromkeys(code(lang) for lang in train_languages))
    if ENGLISH in alignment_codes:
        raise ValueError("English is the target side of every alignment pair: pass only non-English languages.")
    if not eval_codes:
        raise ValueError("`eval_languages` is empty: name at least one language to evaluate.")

    english = help_markup(ENGLISH, cache_dir)
    # English paragraphs per split, deduplicated by text in split order (train, alignment, eval)
    seen: set[str] = set()
    english_split: dict[str, str] = {}
    for split in SPLITS:
        for paragraph_id in sorted(english):
            record = english[paragraph_id]
            if page_split(page_of(paragraph_id), seed, split_fractions, dev_fraction) != split:
                continue
            if by_application and application_of(paragraph_id) is None:
                continue
            key = record["text"].casefold()
            if key in seen or not _usable_english(record, min_chars, max_chars):
                seen.add(key)
                continue
            seen.add(key)
            english_split[paragraph_id] = split

    result = TaskParagraphs(seed=seed)
    for language in dict.fromkeys([*train_codes, *alignment_codes, *eval_codes]):
        per_split: dict[str, list[dict]] = {split: [] for split in SPLITS}
        if language == ENGLISH:
            for paragraph_id, split in english_split.items():
                per_split[split].append({"id": paragraph_id, **english[paragraph_id]})
                if by_application:
                    per_split[split][-1]["label"] = application_of(paragraph_id)
        else:
            translated, seen_sources = help_markup(language, cache_dir), set()
            for paragraph_id in sorted(translated):
                split = english_split.get(paragraph_id)
                if split is None:
                    continue
                record, original = translated[paragraph_id], english[paragraph_id]
                source, target = record["text"], original["text"]
                if source in seen_sources or "[" in source or "]" in source:
                    continue
                if _classes(record) != _classes(original):
                    continue
                if any(";" in source[start:end] for start, end, _ in record["spans"]):
                    continue
                if not _keep_pair(source, target, min_chars, max_chars, max_overlap):
                    continue
                seen_sources.add(source)
                per_split[split].append({"id": paragraph_id, **record, "english": original})
                if by_application:
                    per_split[split][-1]["label"] = application_of(paragraph_id)
        result.counts[language] = {split: len(rows) for split, rows in per_split.items()}
        result.counts[language].update(
            {f"{split}_with_spans": sum(1 for p in rows if p["spans"]) for split, rows in per_split.items()}
        )
        uses = [
            (split, target, limit)
            for split, target, limit, used in (
                ("train", result.train, max_train, language in train_codes),
                ("dev", result.dev, max_dev, language in train_codes and dev_fraction > 0),
                ("alignment", result.alignment, max_alignment, language in alignment_codes),
                ("eval", result.eval, max_eval, language in eval_codes),
            )
            if used
        ]
        for split, target, limit in uses:
            fraction = 1.0 if split == "alignment" else no_span_fraction  # pairs need no spans
            balance = by_application and split != "alignment"
            rows = _cap(per_split[split], limit, fraction, seed, f"{language}:{split}", balance)
            if len(rows) < min_paragraphs and fraction < 1.0 and result.counts[language][f"{split}_with_spans"] == 0:
                message = (
                    f"Language {language!r} has no gold spans in the {split} pages: none of its paragraphs there with "
                    f"markup matching the English original ({result.counts[language][split]}) has a span, so a task "
                    "with spans cannot be scored on it. Use it for alignment pairs or translation only, or "
                    "set no_span_fraction=1.0 to keep paragraphs without spans."
                )
            else:
                message = (
                    f"Language {language!r} has only {len(rows)} usable paragraphs in the {split} pages (needs "
                    f"min_paragraphs={min_paragraphs}; usable per split before the caps: {result.counts[language]}; "
                    f"at most no_span_fraction={fraction} of them without spans). Lower `min_paragraphs` "
                    "(--min_paragraphs), raise `max_chars` (--max_chars), or drop the language."
                )
            if len(rows) < min_paragraphs:
                if drop_short_languages and split not in ("train", "dev"):
                    logger.warning(message + " Dropping it.")
                    continue
                raise ValueError(message)
            target[language] = rows
    # Languages in the order they were asked for
    result.eval = {lang: result.eval[lang] for lang in eval_codes if lang in result.eval}
    result.alignment = {lang: result.alignment[lang] for lang in alignment_codes if lang in result.alignment}
    return result


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """Write rows as JSON lines atomically (a temporary sibling renamed onto `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(path)
    with open(temporary, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(temporary, path)


def annotate(text: str, spans: Sequence[Sequence]) -> str:
    """
    MASSIVE's `annot_utt` of a paragraph: each span replaced by `[class : span]`.

    Example:

    ```python
    >>> annotate("Choose Format - Cells.", [[7, 21, "menuitem"]])
    'Choose [menuitem : Format - Cells].'
    ```
    """
    pieces, position = [], 0
    for start, end, name in sorted(spans):
        pieces += [text[position:start], f"[{name} : {text[start:end]}]"]
        position = end
    return "".join([*pieces, text[position:]])


def bio_tokens(text: str, spans: Sequence[Sequence], language: str) -> tuple[list[str], list[str]]:
    """
    Tokens and BIO tags (Universal NER style) of a paragraph, with every span boundary a token boundary.

    Only the classes of [`STRUCTURED_TAGS`] are tagged; other spans are `O`. Languages written with spaces are split
    at whitespace and at span boundaries, so the structured-generation task (which joins tokens with a space) reads
    each entity back exactly; the sentence shown to the model gets a space where a span touched a neighbour
    (`"Cells."` -> `"Cells ."`). Languages written without spaces (`ja`, `km`, `zh`, ...) are joined without a space by
    that task, so their tokens are the runs `\\S+\\s*` (each keeps its trailing whitespace), again cut at span
    boundaries: joining them gives back the paragraph and every entity exactly.

    Example:

    ```python
    >>> bio_tokens("Choose Format - Cells.", [[7, 21, "menuitem"]], "de")
    (['Choose', 'Format', '-', 'Cells', '.'], ['O', 'B-LOC', 'I-LOC', 'I-LOC', 'O'])
    ```
    """
    no_space = language.split("-")[0].split("_")[0].lower() in _NO_SPACE
    tokens, tags, position = [], [], 0
    segments = []
    for start, end, name in sorted(spans):
        segments += [(text[position:start], None), (text[start:end], STRUCTURED_TAGS.get(name))]
        position = end
    segments.append((text[position:], None))
    for segment, tag in segments:
        words = _WORDS.findall(segment) if no_space else segment.split()
        if no_space and segment[:1].isspace():  # whitespace before the first word: keep it on the previous token
            if tokens:
                tokens[-1] += segment[: len(segment) - len(segment.lstrip())]
            else:
                words = [segment[: len(segment) - len(segment.lstrip())], *words]
        for i, word in enumerate(words):
            tokens.append(word)
            tags.append("O" if tag is None else f"{'B' if i == 0 else 'I'}-{tag}")
    return tokens, tags


@dataclass
class TaskData:
    """
    What [`write_task_data`] wrote: the paths the recipe reads and the language codes as the recipe spells them.

    Args:
        task (`str`): the task.
        dataset (`str`): `--dataset_name` (a file or folder).
        pairs (`str` or `None`): `--alignment_dataset_name` (JSON lines of pairs), when there are alignment languages.
        probe_pairs (`str`): held-out eval-page pairs (`language`, `parallel_source`, `parallel_target`) for probing.
        train_languages, alignment_languages, eval_languages (`list[str]`): recipe codes.
        languages (`dict[str, str]`): help language code -> recipe code.
        counts (`dict[str, dict[str, int]]`): usable paragraphs per help language and split.
        rows (`dict[str, dict[str, int]]`): rows written per recipe code and split.
    """

    task: str
    dataset: str
    pairs: str | None
    probe_pairs: str
    train_languages: list[str]
    alignment_languages: list[str]
    eval_languages: list[str]
    languages: dict[str, str]
    counts: dict[str, dict[str, int]]
    rows: dict[str, dict[str, int]]


def write_task_data(
    task: Task, paragraphs: TaskParagraphs, output_dir: str | os.PathLike, translation_directions: str = "both"
) -> TaskData:
    """
    Write the paragraphs in the input format of a recipe, so the recipe runs unchanged with
    `--dataset_name <dataset>` (and `--alignment_dataset_name <pairs>`):

    - `classification`: a folder with `train.jsonl` (English, train pages), `dev.jsonl` (English, dev pages) and
      `test.jsonl` (every evaluated language, eval pages), rows `id`, `text`, `label` (the application, see
      [`application_of`]), `language`; the recipe reads them with `--text_column text --label_column label
      --language_column language`.
    - `slot_filling`: `massive.jsonl`, MASSIVE rows with `partition` `train` (English, train pages), `dev` (English,
      dev pages) and `test` (every evaluated language, eval pages); `id` is the paragraph id, shared across languages; the slot types are
      the span classes, and a paragraph without spans has `annot_utt == utt` (answer `None`).
    - `translation`: a folder with `train.jsonl`, `dev.jsonl` and `test.jsonl`, rows `{"translation": {lang: ..., "en": ...}}`;
      the train languages' paragraphs of the train pages and every evaluated language's of the eval pages.
    - `structured_generation`: a folder with `train.jsonl` (English), `dev.jsonl` and `test.jsonl`, rows `language`, `tokens`,
      `ner_tags` (see [`bio_tokens`]).

    Every task also gets `pairs.jsonl` (alignment pairs from the alignment pages, with the recipe's language column)
    and `probe_pairs.jsonl` (eval-page pairs for retrieval probing, `language` = help code).

    Args:
        task (`str`):
            One of [`TASKS`].
        paragraphs ([`TaskParagraphs`]):
            From [`libreoffice_task_paragraphs`].
        output_dir (`str` or `os.PathLike`):
            Folder to write into (`<output_dir>/<task>/...`).
        translation_directions (`str`, *optional*, defaults to `"both"`):
            Evaluated translation directions: `"into_english"` (`xx-en`), `"out_of_english"` (`en-xx`) or `"both"`.

    Raises:
        ValueError: A span task with an evaluated language that has no gold span (its F1 would be meaningless), an
            unknown task, or two help languages that the recipe spells the same (e.g. `zh-cn` and `zh-tw` as `zh`).
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if translation_directions not in ("into_english", "out_of_english", "both"):
        raise ValueError(
            f"translation_directions must be into_english, out_of_english or both, got {translation_directions!r}."
        )
    all_languages = dict.fromkeys([*paragraphs.train, *paragraphs.alignment, *paragraphs.eval])
    codes = {language: task_language_code(language, task) for language in all_languages}
    clashes = [c for c, n in Counter(codes.values()).items() if n > 1]
    if clashes:
        raise ValueError(
            f"Help languages {[lang for lang, c in codes.items() if c in clashes]} all become {clashes} in the "
            f"{task} recipe's data; keep one of them."
        )
    if task == "translation" and ENGLISH in paragraphs.train:
        raise ValueError(
            "Translation needs task data in a non-English language (e.g. train_languages=['de'] for de-en and en-de)."
        )
    for language, rows in paragraphs.eval.items():
        if task in ("slot_filling", "structured_generation") and language != ENGLISH:
            wanted = set(SPAN_CLASSES) if task == "slot_filling" else set(STRUCTURED_TAGS)
            gold = sum(1 for row in rows for _, _, name in row["spans"] if name in wanted)
            if gold == 0:
                raise ValueError(
                    f"Language {language!r} has no gold span of {sorted(wanted)} among its {len(rows)} evaluation "
                    f"paragraphs, so {task} cannot be scored there; drop it from the evaluated languages."
                )

    folder = Path(output_dir) / task
    column = "locale" if task == "slot_filling" else "language"
    written: dict[str, dict[str, int]] = {}

    def count(language: str, split: str, n: int) -> None:
        written.setdefault(codes[language], {}).setdefault(split, 0)
        written[codes[language]][split] += n

    if task == "classification":
        missing = [lang for lang, items in paragraphs.eval.items() for p in items[:1] if "label" not in p]
        if missing:
            raise ValueError(
                f"The paragraphs of {missing} have no application label: build them with "
                "libreoffice_task_paragraphs(..., by_application=True)."
            )
        for split, groups in (("train", paragraphs.train), ("dev", paragraphs.dev), ("test", paragraphs.eval)):
            rows = [
                {"id": p["id"], "text": p["text"], "label": p["label"], "language": codes[language]}
                for language, items in groups.items()
                for p in items
            ]
            for language, items in groups.items():
                count(language, split, len(items))
            _write_jsonl(folder / f"{split}.jsonl", rows)
        dataset = folder
    elif task == "slot_filling":
        rows = []
        for partition, groups in (("train", paragraphs.train), ("dev", paragraphs.dev), ("test", paragraphs.eval)):
            for language, items in groups.items():
                for p in items:
                    rows.append(
                        {
                            "id": p["id"],
                            "locale": codes[language],
                            "partition": partition,
                            "utt": p["text"],
                            "annot_utt": annotate(p["text"], p["spans"]),
                        }
                    )
                count(language, partition, len(items))
        dataset = folder / "massive.jsonl"
        _write_jsonl(dataset, rows)
    elif task == "translation":
        for split, groups in (("train", paragraphs.train), ("dev", paragraphs.dev)):
            rows = []
            for language, items in groups.items():
                rows += [{"translation": {codes[language]: p["text"], ENGLISH: p["english"]["text"]}} for p in items]
                count(language, split, len(items))
            if rows or split == "train":
                _write_jsonl(folder / f"{split}.jsonl", rows)
        test = []
        for language, items in paragraphs.eval.items():
            if language == ENGLISH:
                continue
            test += [{"translation": {codes[language]: p["text"], ENGLISH: p["english"]["text"]}} for p in items]
            count(language, "test", len(items))
        dataset = folder
        _write_jsonl(folder / "test.jsonl", test)
    else:
        splits = {"train": [], "dev": [], "test": []}
        for split, groups in (("train", paragraphs.train), ("dev", paragraphs.dev), ("test", paragraphs.eval)):
            for language, items in groups.items():
                for p in items:
                    tokens, tags = bio_tokens(p["text"], p["spans"], codes[language])
                    splits[split].append(
                        {"id": p["id"], "language": codes[language], "tokens": tokens, "ner_tags": tags}
                    )
                count(language, split, len(items))
        dataset = folder
        for split, rows in splits.items():
            if rows or split != "dev":
                _write_jsonl(folder / f"{split}.jsonl", rows)

    pairs = None
    if paragraphs.alignment:
        pair_rows = []
        for language, items in paragraphs.alignment.items():
            pair_rows += [
                {column: codes[language], "parallel_source": p["text"], "parallel_target": p["english"]["text"]}
                for p in items
            ]
            count(language, "alignment", len(items))
        pairs = folder / "pairs.jsonl"
        _write_jsonl(pairs, pair_rows)
    probe_rows = [
        {"language": language, "parallel_source": p["text"], "parallel_target": p["english"]["text"], "id": p["id"]}
        for language, items in paragraphs.eval.items()
        if language != ENGLISH
        for p in items
    ]
    probe_pairs = folder / "probe_pairs.jsonl"
    _write_jsonl(probe_pairs, probe_rows)

    eval_codes = [codes[lang] for lang in paragraphs.eval if not (task == "translation" and lang == ENGLISH)]
    train_codes = [codes[lang] for lang in paragraphs.train]
    alignment_codes = [codes[lang] for lang in paragraphs.alignment]
    if task == "translation":
        train_codes = [d for c in train_codes for d in (f"{c}-{ENGLISH}", f"{ENGLISH}-{c}")]
        into = [f"{c}-{ENGLISH}" for c in eval_codes] if translation_directions != "out_of_english" else []
        out = [f"{ENGLISH}-{c}" for c in eval_codes] if translation_directions != "into_english" else []
        eval_codes = [*into, *out]
    return TaskData(
        task=task,
        dataset=str(dataset),
        pairs=None if pairs is None else str(pairs),
        probe_pairs=str(probe_pairs),
        train_languages=train_codes,
        alignment_languages=alignment_codes,
        eval_languages=eval_codes,
        languages=codes,
        counts={lang: paragraphs.counts[lang] for lang in all_languages},
        rows=written,
    )
