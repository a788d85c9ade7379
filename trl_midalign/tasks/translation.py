"""Machine translation with ALMA-style prompts, scored per direction with BLEU and chrF (sacrebleu) and COMET.

Data: rows with a `translation` column of `{language code: sentence}` dicts, the layout of ALMA's training data and of
the WMT test sets. A direction `de-en` uses every row that has both a `de` and an `en` sentence. The "languages" of
the task are directions (`source-target`). Alignment pairs are the training pairs themselves: each non-English
sentence with its English side.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from datasets import Dataset, concatenate_datasets

from .arguments import RecipeArguments
from .languages import LANGUAGE_NAMES, check_languages
from .loading import as_task_row, is_local, load_split, pairs_from_lists, require_columns


NAME = "translation"
MAIN_METRIC = "chrf"
DEFAULT_TEST_SET = "haoranxu/WMT23-Test"
PROMPT = "Translate this from {source_name} to {target_name}:\n{source_name}: {text}\n{target_name}:"


@dataclass
class TranslationArguments(RecipeArguments):
    """
    The arguments of `recipes/translation.py`: those of [`~trl_midalign.tasks.arguments.RecipeArguments`], where
    the "languages" of the task and of the evaluation are translation directions (`source-target`, e.g. `de-en`), plus
    COMET settings.

    Parameters:
        translation_column (`str`, *optional*, defaults to `"translation"`):
            Column of `{language code: sentence}` dicts.
        comet_model (`str`, *optional*):
            COMET checkpoint for an extra score, e.g. `"Unbabel/wmt22-comet-da"` (needs `unbabel-comet`).
    """

    dataset_name: str | None = field(
        default="haoranxu/ALMA-Human-Parallel",
        metadata={"help": "Training data: Hub id or local file/folder with a 'translation' column of dicts."},
    )
    dataset_config: str | None = field(
        default="{lang}-en",
        metadata={
            "help": "Hub configuration per direction: '{lang}' is its non-English language, '{src}'/'{tgt}' its sides."
        },
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation data (Hub id or local, same layout); default: the test split of a local dataset_name, "
            "else haoranxu/WMT23-Test."
        },
    )
    eval_dataset_config: str | None = field(
        default=None,
        metadata={"help": "Hub configuration of the evaluation data per direction ('{src}-{tgt}' for WMT23-Test)."},
    )
    train_languages: list[str] = field(
        default_factory=lambda: ["de-en", "en-de"],
        metadata={"help": "Translation directions of the task data, source-target (e.g. de-en,en-de)."},
    )
    eval_languages: list[str] | None = field(
        default=None, metadata={"help": "Directions evaluated; defaults to the training directions."}
    )
    alignment_languages: list[str] | None = field(
        default=None,
        metadata={"help": "Non-English languages aligned with English; default: those of the training directions."},
    )
    translation_column: str = field(default="translation", metadata={"help": "Column of {language: sentence} dicts."})
    comet_model: str | None = field(
        default=None, metadata={"help": "COMET checkpoint for an extra score (needs unbabel-comet)."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum generated tokens per translation."})


def split_direction(direction: str, option: str) -> tuple[str, str]:
    """`"de-en"` -> `("de", "en")`, failing clearly on anything else (naming `option`, the argument that held it)."""
    parts = direction.split("-")
    if len(parts) != 2 or not all(parts):
        raise ValueError(
            f"{option}: {direction!r} is not a translation direction; write it as source-target, e.g. de-en."
        )
    for code in parts:
        check_languages([code], LANGUAGE_NAMES, option, "language code")
    return parts[0], parts[1]


def prompt(text: str, direction: str) -> str:
    """The ALMA prompt that asks for the translation of `text` in `direction` (`source-target`)."""
    source, target = direction.split("-")
    return PROMPT.format(source_name=LANGUAGE_NAMES[source], target_name=LANGUAGE_NAMES[target], text=text)


def direction_rows(
    name: str,
    config: str | None,
    split: str,
    direction: str,
    pivot: str,
    translation_column: str = "translation",
    revision: str | None = None,
    max_rows: int | None = None,
) -> Dataset:
    """
    The rows of one direction: Hub data loaded with the direction's configuration, local data filtered.

    Args:
        name (`str`):
            Hub dataset id or local path.
        config (`str`, *optional*):
            Hub configuration; `{lang}` is the direction's non-English language, `{src}`/`{tgt}` its sides.
        split (`str`):
            The split to load.
        direction (`str`):
            `source-target`, e.g. `"de-en"`.
        pivot (`str`):
            The English language code.
        translation_column (`str`, *optional*, defaults to `"translation"`):
            Column of `{language: sentence}` dicts.
        revision (`str`, *optional*):
            Hub revision.
        max_rows (`int`, *optional*):
            Keep at most this many rows.

    Returns:
        [`~datasets.Dataset`]: columns `source`, `target` and `direction`.
    """
    source, target = direction.split("-")
    if is_local(name):
        data = load_split(name, None, split)
    else:
        lang = source if target == pivot else target
        resolved = config.format(lang=lang, src=source, tgt=target) if config else None
        data = load_split(name, resolved, split, revision)
    require_columns(
        data,
        [translation_column],
        name,
        "Give each row a translation dict such as {'de': '...', 'en': '...'}, or set --translation_column.",
    )
    keep = [i for i, row in enumerate(data[translation_column]) if row and row.get(source) and row.get(target)]
    if not keep:
        raise ValueError(f"{name} ({split}) has no row with both a {source!r} and a {target!r} sentence.")
    rows = data.select(keep[:max_rows])[translation_column]
    return Dataset.from_dict(
        {
            "source": [r[source] for r in rows],
            "target": [r[target] for r in rows],
            "direction": [direction] * len(rows),
        }
    )


def examples(rows: Dataset, conversational: bool) -> list[dict]:
    """Evaluation examples (`language` = the direction, `prompt`, `reference`, `source`) of [`direction_rows`]."""
    return [
        {
            "language": row["direction"],
            "prompt": as_task_row(prompt(row["source"], row["direction"]), "", conversational)["prompt"],
            "reference": row["target"],
            "source": row["source"],
        }
        for row in rows
    ]


def train_dataset(rows: Dataset, conversational: bool) -> Dataset:
    """The task rows of [`direction_rows`]: TRL prompt-completion rows with a `language` column (the direction)."""
    return Dataset.from_list(
        [
            {**as_task_row(prompt(row["source"], row["direction"]), row["target"], conversational), "language": d}
            for row, d in zip(rows, rows["direction"])
        ]
    )


def default_alignment_languages(directions: Sequence[str], pivot: str) -> list[str]:
    """The non-English languages of the training directions, in order."""
    languages = [d.split("-")[0] if d.split("-")[1] == pivot else d.split("-")[1] for d in directions]
    return [lang for lang in dict.fromkeys(languages) if lang != pivot]


def pairs_from_directions(
    rows: Dataset, languages: Sequence[str], pivot: str, max_pairs: int | None = None
) -> Dataset:
    """
    Alignment pairs from the training rows: for each language, its sentences with their English side, taken from the
    directions `lang-pivot` and `pivot-lang`.
    """
    parts = []
    for lang in languages:
        pairs = {}
        for source, target, direction in zip(rows["source"], rows["target"], rows["direction"]):
            if direction == f"{lang}-{pivot}":
                pairs[source] = target
            elif direction == f"{pivot}-{lang}":
                pairs[target] = source
        if not pairs:
            raise ValueError(
                f"--alignment_languages {lang}: no training direction pairs {lang} with {pivot}, so the task rows hold "
                "no such pairs. Add the direction, or give --alignment_dataset_name."
            )
        parts.append(pairs_from_lists(list(pairs), list(pairs.values()), lang, max_pairs))
    return concatenate_datasets(parts)


def sacrebleu_tokenizer(target_language: str | None) -> str:
    """
    The sacrebleu tokenizer suited to a target language: `"zh"` for Chinese, `"char"` for Japanese, Korean and Thai
    (written without spaces), `"13a"` (sacrebleu's default) otherwise.

    Args:
        target_language (`str` or `None`):
            Language code of the references, such as `"de"` or `"zh-CN"`.

    Returns:
        `str`: a value for `sacrebleu.corpus_bleu(..., tokenize=...)`.
    """
    base = (target_language or "").split("-")[0].split("_")[0].lower()
    if base == "zh":
        return "zh"
    if base in ("ja", "ko", "th"):
        return "char"
    return "13a"


def translation_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    target_language: str | None = None,
    sources: Sequence[str] | None = None,
    comet_model: str | None = None,
    comet_batch_size: int = 8,
) -> dict[str, float]:
    """
    Corpus BLEU and chrF of translations (sacrebleu), and COMET when asked for.

    Args:
        predictions (`Sequence[str]`):
            System translations.
        references (`Sequence[str]`):
            One reference translation per prediction.
        target_language (`str`, *optional*):
            Language of the references; picks the BLEU tokenizer (see [`sacrebleu_tokenizer`]).
        sources (`Sequence[str]`, *optional*):
            Source sentences; needed for COMET.
        comet_model (`str`, *optional*):
            A COMET checkpoint name such as `"Unbabel/wmt22-comet-da"`. Needs the `unbabel-comet` package.
        comet_batch_size (`int`, *optional*, defaults to `8`):
            Batch size of the COMET model.

    Returns:
        `dict[str, float]`: `bleu` and `chrf` (0-100), and `comet` (0-100) with `comet_model`.
    """
    try:
        import sacrebleu
    except ImportError as error:
        raise ImportError(
            "Translation scores need sacrebleu: `pip install sacrebleu` (or `pip install trl-midalign[recipes]`)."
        ) from error
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} translations for {len(references)} references; they must pair up one to one."
        )
    predictions, references = [str(p) for p in predictions], [str(r) for r in references]
    tokenize = sacrebleu_tokenizer(target_language)
    scores = {
        "bleu": sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
    }
    if comet_model is not None:
        if sources is None or len(sources) != len(predictions):
            raise ValueError("COMET needs one source sentence per translation: pass `sources`.")
        try:
            from comet import download_model, load_from_checkpoint
        except ImportError as error:
            raise ImportError(
                f"comet_model={comet_model!r} needs the COMET package: `pip install unbabel-comet`, or leave "
                "comet_model unset to report BLEU and chrF only."
            ) from error
        model = load_from_checkpoint(download_model(comet_model))
        data = [{"src": s, "mt": p, "ref": r} for s, p, r in zip(sources, predictions, references)]
        output = model.predict(data, batch_size=comet_batch_size, gpus=1 if torch.cuda.is_available() else 0)
        scores["comet"] = 100 * float(output.system_score)
    return scores


def score(predictions: Sequence[str], references: Sequence[str], direction: str) -> dict[str, float]:
    """BLEU and chrF of one direction's translations, tokenized for its target language (COMET: see [`scorer`])."""
    return translation_scores(predictions, references, target_language=direction.split("-")[1])


def scorer(examples: Sequence[dict], comet_model: str | None = None) -> Callable[[list[str], list[str], str], dict]:
    """
    The `score(predictions, references, direction)` of [`~trl_midalign.tasks.report.evaluate_examples`] for
    translation: [`translation_scores`] with the direction's target language and, for COMET, its source sentences
    (taken from `examples`, in order).
    """

    def score(predictions: list[str], references: list[str], direction: str) -> dict[str, float]:
        sources = [e["source"] for e in examples if e["language"] == direction]
        target = direction.split("-")[1]
        return translation_scores(
            predictions, references, target_language=target, sources=sources, comet_model=comet_model
        )

    return score
