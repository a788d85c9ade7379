"""Pieces shared by the three recipes: arguments, data loading, alignment pairs, checks, evaluation and the push.

The recipes import this module from their own folder (`accelerate launch recipes/slot_filling.py` puts `recipes/` on
the path). Everything here is plain functions; each recipe's `main` reads top to bottom like TRL's `sft.py`.
"""

import difflib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import yaml
from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset, load_from_disk
from trl import ModelConfig

from trl_midalign.cli import describe_negative_flags
from trl_midalign.evaluation import (
    PLOT_FILE,
    generate_completions,
    load_results,
    plot_results,
    summarize_groups,
    write_results,
)
from trl_midalign.hub import check_hub_settings, find_probe_plots, model_card, public_name, push_folder


logger = logging.getLogger(__name__)

RANK_CHECKSUMS_FILE = "rank_checksums.json"
PAPER_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAIR_COLUMNS = ("parallel_source", "parallel_target")

# ISO 639-1 codes (and a few ISO 639-3 codes of languages without one) with English names, for prompts and checks.
LANGUAGE_NAMES = {
    "af": "Afrikaans", "am": "Amharic", "ar": "Arabic", "as": "Assamese", "az": "Azerbaijani", "be": "Belarusian",
    "bg": "Bulgarian", "bn": "Bengali", "bo": "Tibetan", "br": "Breton", "bs": "Bosnian", "ca": "Catalan",
    "ceb": "Cebuano", "cs": "Czech", "cy": "Welsh", "da": "Danish", "de": "German", "dz": "Dzongkha", "el": "Greek",
    "en": "English", "eo": "Esperanto", "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian",
    "fi": "Finnish", "fil": "Filipino", "fo": "Faroese", "fr": "French", "fy": "Western Frisian", "ga": "Irish",
    "gd": "Scottish Gaelic", "gl": "Galician", "gu": "Gujarati", "ha": "Hausa", "he": "Hebrew", "hi": "Hindi",
    "hr": "Croatian", "ht": "Haitian Creole", "hu": "Hungarian", "hy": "Armenian", "id": "Indonesian", "ig": "Igbo",
    "is": "Icelandic", "it": "Italian", "ja": "Japanese", "jv": "Javanese", "ka": "Georgian", "kk": "Kazakh",
    "km": "Khmer", "kn": "Kannada", "ko": "Korean", "ku": "Kurdish", "ky": "Kyrgyz", "la": "Latin",
    "lb": "Luxembourgish", "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian", "mg": "Malagasy", "mi": "Maori",
    "mk": "Macedonian", "ml": "Malayalam", "mn": "Mongolian", "mr": "Marathi", "ms": "Malay", "mt": "Maltese",
    "my": "Burmese", "nb": "Norwegian Bokmal", "ne": "Nepali", "nl": "Dutch", "nn": "Norwegian Nynorsk",
    "no": "Norwegian", "ny": "Chichewa", "oc": "Occitan", "om": "Oromo", "or": "Odia", "pa": "Punjabi", "pl": "Polish",
    "ps": "Pashto", "pt": "Portuguese", "qu": "Quechua", "ro": "Romanian", "ru": "Russian", "rw": "Kinyarwanda",
    "sa": "Sanskrit", "sd": "Sindhi", "si": "Sinhala", "sk": "Slovak", "sl": "Slovenian", "sm": "Samoan",
    "sn": "Shona", "so": "Somali", "sq": "Albanian", "sr": "Serbian", "st": "Sesotho", "su": "Sundanese",
    "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "te": "Telugu", "tg": "Tajik", "th": "Thai", "ti": "Tigrinya",
    "tk": "Turkmen", "tl": "Tagalog", "tr": "Turkish", "tt": "Tatar", "ug": "Uyghur", "uk": "Ukrainian", "ur": "Urdu",
    "uz": "Uzbek", "vi": "Vietnamese", "wo": "Wolof", "xh": "Xhosa", "yi": "Yiddish", "yo": "Yoruba", "yue": "Cantonese",
    "zh": "Chinese", "zu": "Zulu",
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
def _split_list(value: Any) -> list[str] | None:
    """Accept `["de", "fr"]`, `"de,fr"` or `["de,fr"]` (from YAML or the command line) as `["de", "fr"]`."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    return [part.strip() for item in items for part in str(item).split(",") if part.strip()]


@dataclass
class RecipeArguments:
    """
    Arguments shared by the recipes (data, languages, alignment pairs, evaluation). Each recipe subclasses this with
    its own defaults and fields.

    Parameters:
        dataset_name (`str`):
            Hub dataset id, or a local path: a `.jsonl`/`.json`/`.csv`/`.parquet` file, a folder of such files named
            after their splits (`train.jsonl`, `test.jsonl`), or a folder written by `Dataset.save_to_disk`.
        dataset_config (`str`, *optional*):
            Hub dataset configuration; `{lang}` in it is replaced by each language, loading one configuration per
            language (e.g. `"{lang}"` for MASSIVE's per-locale configurations).
        dataset_revision (`str`, *optional*):
            Hub revision, e.g. `"refs/convert/parquet"` for a dataset whose loading script `datasets` no longer runs.
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split with the task training rows.
        dataset_test_split (`str`, *optional*, defaults to `"test"`):
            Split evaluated after training.
        eval_dataset_name (`str`, *optional*):
            A different dataset for evaluation (same forms as `dataset_name`); defaults to `dataset_name`.
        eval_dataset_config (`str`, *optional*):
            Configuration of `eval_dataset_name` (`{lang}` allowed); defaults to `dataset_config`.
        language_column (`str`, *optional*):
            Column holding each row's language in local data (Hub data loaded per `{lang}` gets it filled in).
        train_languages (`list[str]`):
            Languages of the task training data.
        eval_languages (`list[str]`, *optional*):
            Languages evaluated; defaults to every language of the test split for local data, or to the task and
            alignment languages for Hub data loaded per language.
        alignment (`bool`, *optional*, defaults to `True`):
            Train with the middle-layer alignment loss (`AlignmentTrainer`); `False` runs the plain SFT baseline
            (`trl.SFTTrainer`) with the same data and settings.
        alignment_dataset_name (`str`, *optional*):
            Dataset of parallel pairs (Hub or local): columns `parallel_source`/`parallel_target` (with an optional
            language column), or a `translation` column of `{language: sentence}` dicts. Without it the pairs come
            from the task rows where the recipe can build them.
        alignment_dataset_config (`str`, *optional*):
            Configuration of the pair dataset; `{lang}` is replaced by each alignment language.
        alignment_dataset_split (`str`, *optional*, defaults to `"train"`):
            Split of the pair dataset.
        alignment_languages (`list[str]`, *optional*):
            Non-English languages whose pairs (with English) are mixed into training.
        alignment_pivot_language (`str`, *optional*, defaults to `"en"`):
            The English side of the pairs, as written in the pair dataset (`"en-US"` for MASSIVE).
        max_alignment_pairs (`int`, *optional*):
            Keep at most this many pairs per alignment language.
        max_train_samples (`int`, *optional*):
            Keep at most this many task rows per training language.
        max_eval_samples (`int`, *optional*):
            Evaluate at most this many rows per language.
        max_new_tokens (`int`, *optional*, defaults to `64`):
            Maximum generated tokens per evaluation example.
        eval_only (`bool`, *optional*, defaults to `False`):
            Skip training; evaluate the adapter at `adapter_path`.
        adapter_path (`str`, *optional*):
            Adapter evaluated with `eval_only`; defaults to `output_dir`.
        compare_with (`str`, *optional*):
            Results of another run (its output_dir or `eval_results.json`), drawn next to this run's in the plot, e.g.
            the baseline when this is the aligned run.
        check_ranks (`bool`, *optional*, defaults to `True`):
            After multi-process training, check that every process holds identical trainable weights, and write
            their checksums to `rank_checksums.json`.
    """

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id, or a local file or folder."})
    dataset_config: str | None = field(
        default=None, metadata={"help": "Hub dataset configuration; '{lang}' loads one configuration per language."}
    )
    dataset_revision: str | None = field(
        default=None, metadata={"help": "Hub revision, e.g. 'refs/convert/parquet' for script-based datasets."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split with the task training rows."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split evaluated after training."})
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Another dataset for evaluation; defaults to dataset_name."}
    )
    eval_dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration of eval_dataset_name ('{lang}' allowed)."}
    )
    language_column: str = field(default="language", metadata={"help": "Column with each row's language."})
    train_languages: list[str] = field(
        default_factory=lambda: ["en"], metadata={"help": "Languages of the task training data."}
    )
    eval_languages: list[str] | None = field(
        default=None,
        metadata={"help": "Languages evaluated; default: all in the test data (local) or task + alignment languages."},
    )
    alignment: bool = field(
        default=True,
        metadata={"help": "Train with the alignment loss (AlignmentTrainer); false: plain SFT baseline (SFTTrainer)."},
    )
    alignment_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Parallel pairs (Hub or local); default: pairs built from the task rows where possible."},
    )
    alignment_dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration of the pair dataset; '{lang}' loads one per language."}
    )
    alignment_dataset_split: str = field(default="train", metadata={"help": "Split of the pair dataset."})
    alignment_languages: list[str] | None = field(
        default=None, metadata={"help": "Non-English languages whose pairs with English are mixed into training."}
    )
    alignment_pivot_language: str = field(
        default="en", metadata={"help": "The English side of the pairs as written in the data ('en-US' for MASSIVE)."}
    )
    max_alignment_pairs: int | None = field(
        default=None, metadata={"help": "Keep at most this many pairs per alignment language."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep at most this many task rows per training language."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate at most this many rows per language."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum generated tokens per evaluation example."})
    eval_only: bool = field(
        default=False, metadata={"help": "Skip training and evaluate the adapter at adapter_path."}
    )
    adapter_path: str | None = field(
        default=None, metadata={"help": "Adapter evaluated with --eval_only; defaults to output_dir."}
    )
    compare_with: str | None = field(
        default=None,
        metadata={"help": "Another run's output_dir or eval_results.json, plotted next to this run (e.g. baseline)."},
    )
    check_ranks: bool = field(
        default=True,
        metadata={"help": "After multi-process training, check that all processes hold identical trainable weights."},
    )

    def __post_init__(self):
        for name in ("train_languages", "eval_languages", "alignment_languages"):
            setattr(self, name, _split_list(getattr(self, name)))
        if not self.dataset_name:
            raise ValueError("dataset_name is required: a Hub dataset id or a local file/folder.")
        for name in ("max_alignment_pairs", "max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or unset for all rows), got {value}.")


@dataclass
class RecipeModelConfig(ModelConfig):
    """
    [`~trl.ModelConfig`] with the paper's LoRA as the default: the recipes train adapters (r=8, alpha=16, dropout 0.1
    on every attention and MLP projection).
    """

    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (the recipes require it)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (the paper: 8)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (the paper: 16)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout (the paper: 0.1)."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: list(PAPER_LORA_MODULES),
        metadata={"help": "Modules with LoRA (default: q,k,v,o,gate,up,down projections, as in the paper)."},
    )


def parse_args(parser, args: Sequence[str] | None = None) -> tuple:
    """
    `parser.parse_args_and_config(args)`, with a clear error for a YAML key no dataclass knows (and the closest
    known keys).

    Args:
        parser ([`~trl.TrlParser`]):
            The recipe's parser.
        args (`Sequence[str]`, *optional*):
            Command-line arguments; defaults to `sys.argv[1:]`.

    Returns:
        `tuple`: one instance per dataclass of the parser.
    """
    import sys

    describe_negative_flags(parser)  # --no_alignment, --no_check_ranks, ...: a help of their own, not the positive's
    argv = list(sys.argv[1:] if args is None else args)
    if "--config" in argv:
        path = argv[argv.index("--config") + 1]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--config {path}: no such file.")
        with open(path) as f:
            config = yaml.safe_load(f) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{path} must hold a YAML mapping of argument names to values.")
        known = {f.name for dataclass_type in parser.dataclass_types for f in fields(dataclass_type)} | {"env"}
        unknown = [key for key in config if key not in known]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=2)
                hints.append(f"{key!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
            raise ValueError(
                f"{path}: unknown key(s) {', '.join(hints)}. Every key must be an argument of the recipe, of "
                "AlignmentConfig (trl.SFTConfig + align_*) or of trl.ModelConfig; fix the spelling or remove it."
            )
    return parser.parse_args_and_config(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Languages
def check_languages(requested: Sequence[str], known: Sequence[str], option: str, what: str = "language code") -> None:
    """
    Fail naming the first unknown code among `requested`, with close known codes and the fix.

    Args:
        requested (`Sequence[str]`):
            Codes given by the user.
        known (`Sequence[str]`):
            Codes the recipe knows.
        option (`str`):
            The argument that held them (e.g. `"--train_languages"`).
        what (`str`, *optional*, defaults to `"language code"`):
            What a code is, for the message.
    """
    for code in requested:
        if code not in known:
            close = difflib.get_close_matches(code, list(known), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"{option}: unknown {what} {code!r}.{hint} Known: {', '.join(sorted(known))}.")


def iso_code(language: str) -> str:
    """The ISO 639 part of a language tag: `"de-DE"` -> `"de"`, `"de_pud"` -> `"de"`, `"zh"` -> `"zh"`."""
    return language.split("_")[0].split("-")[0].lower()


# ----------------------------------------------------------------------------------------------------------------------
# Data
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_local(path: str) -> DatasetDict:
    """Load a local file (its rows are the `train` split), a folder of per-split files, or a `save_to_disk` folder."""
    if os.path.isdir(path):
        if any(
            os.path.exists(os.path.join(path, n)) for n in ("dataset_info.json", "dataset_dict.json", "state.json")
        ):
            loaded = load_from_disk(path)
            return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
        files = sorted(f for f in os.listdir(path) if os.path.splitext(f)[1] in _BUILDERS)
        if not files:
            raise FileNotFoundError(f"{path} holds no .jsonl/.json/.csv/.parquet files and is not a saved dataset.")
        builder = _BUILDERS[os.path.splitext(files[0])[1]]
        by_split: dict[str, list[str]] = {}
        for name in files:
            split = os.path.splitext(name)[0].split("-")[0].split(".")[0]
            by_split.setdefault(split, []).append(os.path.join(path, name))
        return load_dataset(builder, data_files=by_split)
    extension = os.path.splitext(path)[1]
    if extension not in _BUILDERS:
        raise ValueError(f"{path}: unsupported file type {extension!r}; use .jsonl, .json, .csv or .parquet.")
    return load_dataset(_BUILDERS[extension], data_files={"train": path})


def select_split(dataset: DatasetDict, split: str, source: str) -> Dataset:
    """`dataset[split]`, or the rows of that `partition` in single-file MASSIVE data; a clear error otherwise."""
    if split in dataset:
        return dataset[split]
    # MASSIVE's own files keep every split in one file, told apart by a `partition` column ("dev" for validation)
    if len(dataset) == 1:
        (only,) = dataset.values()
        if "partition" in only.column_names:
            wanted = {"validation": "dev"}.get(split, split)
            return only.filter(lambda partition: partition == wanted, input_columns="partition")
    raise ValueError(
        f"{source} has no split {split!r} (its splits: {list(dataset)}). Set --dataset_train_split / "
        "--dataset_test_split, or give a folder with one file per split (train.jsonl, test.jsonl)."
    )


def load_language_rows(
    name: str,
    config: str | None,
    split: str,
    languages: Sequence[str] | None,
    language_column: str,
    revision: str | None = None,
    config_values: Callable[[str], dict[str, str]] | None = None,
) -> Dataset:
    """
    Load one split of a dataset with a language column, keeping the requested languages.

    A local path is read whole and filtered on `language_column`. A Hub dataset whose `config` holds a placeholder
    such as `{lang}` is loaded once per language and the column is filled in; otherwise it is loaded once and
    filtered.

    Args:
        name (`str`):
            Hub dataset id or local path.
        config (`str`, *optional*):
            Hub configuration, possibly with placeholders.
        split (`str`):
            The split to load.
        languages (`Sequence[str]`, *optional*):
            Languages to keep; `None` keeps all (local or single-configuration data only).
        language_column (`str`):
            Column with each row's language.
        revision (`str`, *optional*):
            Hub revision.
        config_values (`Callable[[str], dict[str, str]]`, *optional*):
            Placeholder values of a language (default `{"lang": language}`).

    Returns:
        [`~datasets.Dataset`]: the rows, in language order.
    """
    config_values = config_values or (lambda lang: {"lang": lang})
    is_local = os.path.exists(name)
    if not is_local and config and "{" in config:
        if languages is None:
            raise ValueError(
                f"{name} is loaded one configuration per language ({config!r}), so the languages must be listed "
                "(--train_languages / --eval_languages)."
            )
        parts = []
        for lang in languages:
            part = select_split(load_hub(name, config.format(**config_values(lang)), revision), split, name)
            if language_column in part.column_names:
                part = part.remove_columns(language_column)
            parts.append(part.add_column(language_column, [lang] * len(part)))
        return concatenate_datasets(parts) if parts else Dataset.from_dict({language_column: []})
    dataset = select_split(load_local(name) if is_local else load_hub(name, config, revision), split, name)
    if language_column not in dataset.column_names:
        raise ValueError(
            f"{name} ({split}) has no language column {language_column!r} (its columns: {dataset.column_names}). "
            "Add one, point --language_column at yours, or load per language with a '{lang}' dataset_config."
        )
    if languages is None:
        return dataset
    present = set(dataset.unique(language_column))
    missing = [lang for lang in languages if lang not in present]
    if missing:
        raise ValueError(
            f"{name} ({split}) has no rows for language(s) {missing}; its languages: {sorted(present)}. Fix the "
            "language list or the data."
        )
    wanted = set(languages)
    return dataset.filter(lambda lang: lang in wanted, input_columns=language_column)


def load_hub(name: str, config: str | None, revision: str | None) -> DatasetDict:
    """`load_dataset` from the Hub, with the fix spelled out for datasets defined by a loading script."""
    try:
        return load_dataset(name, config, revision=revision)
    except RuntimeError as error:
        if "script" in str(error).lower():
            raise RuntimeError(
                f"{name} is defined by a loading script, which this version of `datasets` does not run. Load the "
                "Hub's Parquet conversion with --dataset_revision refs/convert/parquet, or download the data and pass "
                "its local path."
            ) from error
        raise


def is_local(name: str | None) -> bool:
    """Whether a dataset name is a local path (else a Hub id)."""
    return bool(name) and os.path.exists(name)


def resolve_alignment_languages(script_args: RecipeArguments) -> list[str]:
    """
    The alignment languages of a run: `[]` for the baseline or `--eval_only`; those given; else, for local task
    data that supplies its own pairs, every language of its training split but the pivot (English).
    """
    if not script_args.alignment or script_args.eval_only:
        return []
    if script_args.alignment_languages:
        return list(script_args.alignment_languages)
    if script_args.alignment_dataset_name or not is_local(script_args.dataset_name):
        raise ValueError(
            "Name the languages to align with --alignment_languages (e.g. sw,te,is), or run the baseline with "
            "--alignment false."
        )
    train = select_split(load_local(script_args.dataset_name), script_args.dataset_train_split, "the training data")
    if script_args.language_column not in train.column_names:
        raise ValueError(
            f"The training data has no language column {script_args.language_column!r}; set --language_column or "
            "--alignment_languages."
        )
    pivot = iso_code(script_args.alignment_pivot_language)
    languages = sorted(lang for lang in set(train.unique(script_args.language_column)) if iso_code(lang) != pivot)
    if not languages:
        raise ValueError(
            "The training data has no language besides the pivot to align; pass --alignment_languages with "
            "--alignment_dataset_name, or --alignment false."
        )
    return languages


def require_columns(dataset: Dataset, columns: Sequence[str], source: str, fix: str) -> None:
    """
    Fail naming every column of `columns` that `dataset` lacks, its actual columns and the fix.

    Args:
        dataset ([`~datasets.Dataset`]):
            The data.
        columns (`Sequence[str]`):
            Columns the recipe needs.
        source (`str`):
            Where the data came from, for the message.
        fix (`str`):
            What the user should do.
    """
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{source} lacks the column(s) {missing} this recipe needs (its columns: {dataset.column_names}). {fix}"
        )


def cap_per_language(dataset: Dataset, language_column: str, limit: int | None) -> Dataset:
    """Keep the first `limit` rows of each language (all rows when `limit` is `None`)."""
    if limit is None:
        return dataset
    seen: dict[str, int] = {}
    keep = []
    for i, lang in enumerate(dataset[language_column]):
        seen[lang] = seen.get(lang, 0) + 1
        if seen[lang] <= limit:
            keep.append(i)
    return dataset.select(keep)


def load_pair_dataset(args: RecipeArguments, seed: int) -> Dataset:
    """
    Load the alignment pairs of `args.alignment_languages` from `args.alignment_dataset_name`, mixed across languages.

    Accepted layouts: columns `parallel_source` and `parallel_target` (filtered on the language column when the data
    has one), or a `translation` column of `{language code: sentence}` dicts from which each alignment language is
    paired with `args.alignment_pivot_language`.

    Args:
        args (`RecipeArguments`):
            The recipe's arguments.
        seed (`int`):
            Seed of the shuffle that mixes the languages.

    Returns:
        [`~datasets.Dataset`]: columns `parallel_source` (the non-English side), `parallel_target` and `language`.
    """
    name, config, languages = args.alignment_dataset_name, args.alignment_dataset_config, args.alignment_languages
    if not languages:
        raise ValueError("--alignment_dataset_name needs --alignment_languages: the languages whose pairs to use.")
    if not os.path.exists(name) and config and "{" in config:
        sources = [
            (lang, select_split(load_hub(name, config.format(lang=lang), None), args.alignment_dataset_split, name))
            for lang in languages
        ]
    else:
        loaded = load_local(name) if os.path.exists(name) else load_hub(name, config, None)
        sources = [(None, select_split(loaded, args.alignment_dataset_split, name))]
    pivot = args.alignment_pivot_language
    parts: dict[str, Dataset] = {}
    for lang, data in sources:
        if all(c in data.column_names for c in PAIR_COLUMNS):
            if lang is None and args.language_column in data.column_names:
                for language in languages:
                    part = data.filter(lambda x, language=language: x == language, input_columns=args.language_column)
                    parts[language] = _pairs(part[PAIR_COLUMNS[0]], part[PAIR_COLUMNS[1]], language, args)
            elif lang is None and len(languages) > 1:
                raise ValueError(
                    f"{name} has pairs but no language column {args.language_column!r} to tell the "
                    f"{len(languages)} alignment languages apart; add the column or pass one language."
                )
            else:
                language = lang or languages[0]
                parts[language] = _pairs(data[PAIR_COLUMNS[0]], data[PAIR_COLUMNS[1]], language, args)
        elif "translation" in data.column_names:
            for language in [lang] if lang else languages:
                rows = [r for r in data["translation"] if r and r.get(language) and r.get(pivot)]
                parts[language] = _pairs([r[language] for r in rows], [r[pivot] for r in rows], language, args)
        else:
            raise ValueError(
                f"The alignment dataset {name} lacks the columns {list(PAIR_COLUMNS)} and a 'translation' column (its "
                f"columns: {data.column_names}). Give it parallel_source (non-English) and parallel_target (English) "
                "columns, or WMT-style translation dicts."
            )
    for language, part in parts.items():
        if len(part) == 0:
            raise ValueError(f"{name} has no {language}-{pivot} pairs; check --alignment_languages and the data.")
    return concatenate_datasets(list(parts.values())).shuffle(seed=seed)


def _pairs(sources: Sequence[str], targets: Sequence[str], language: str, args: RecipeArguments) -> Dataset:
    keep = [i for i, (s, t) in enumerate(zip(sources, targets)) if s and t and str(s).strip() and str(t).strip()]
    if args.max_alignment_pairs is not None:
        keep = keep[: args.max_alignment_pairs]
    return Dataset.from_dict(
        {
            PAIR_COLUMNS[0]: [sources[i] for i in keep],
            PAIR_COLUMNS[1]: [targets[i] for i in keep],
            "language": [language] * len(keep),
        }
    )


def pairs_from_lists(sources: Sequence[str], targets: Sequence[str], language: str, args: RecipeArguments) -> Dataset:
    """Pairs (non-English `sources`, English `targets`) of one language as a pair dataset, capped per language."""
    return _pairs(list(sources), list(targets), language, args)


def pairs_from_rows(rows: Dataset, languages: Sequence[str], args: RecipeArguments) -> Dataset | None:
    """
    Alignment pairs carried by the task data itself (columns `parallel_source`/`parallel_target`), for the given
    languages of `args.language_column`; `None` when the data has no such columns.
    """
    if not all(c in rows.column_names for c in PAIR_COLUMNS):
        return None
    parts = []
    for language in languages:
        part = rows.filter(lambda x, language=language: x == language, input_columns=args.language_column)
        pairs = _pairs(part[PAIR_COLUMNS[0]], part[PAIR_COLUMNS[1]], language, args)
        if len(pairs) == 0:
            raise ValueError(
                f"No {language} row of the training data has a parallel pair; check --alignment_languages."
            )
        parts.append(pairs)
    return concatenate_datasets(parts)


def as_task_row(prompt: str, completion: str, conversational: bool) -> dict:
    """A TRL prompt-completion row: chat messages for a model with a chat template, plain strings otherwise."""
    if conversational:
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": completion}],
        }
    return {"prompt": prompt + "\n", "completion": completion}


# ----------------------------------------------------------------------------------------------------------------------
# Model and launch checks
def model_init_kwargs(training_args, model_args) -> dict:
    """The keyword arguments TRL's `sft.py` passes to `from_pretrained`, merged with `training_args.model_init_kwargs`."""
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=getattr(training_args, "trust_remote_code", False),
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        kwargs.update(training_args.model_init_kwargs)
    return kwargs


def deepspeed_zero_stage(accelerator=None) -> int | None:
    """The DeepSpeed ZeRO stage of this launch, or `None` without DeepSpeed."""
    if accelerator is not None and getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        return accelerator.state.deepspeed_plugin.zero_stage
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return int(stage) if stage else None
    return None


def keep_hub_token_off_disk(training_args) -> bool:
    """
    Move a `--hub_token` out of the training arguments into this process's environment (`HF_TOKEN`).

    transformers pickles the whole `TrainingArguments` into `training_args.bin` in `output_dir` and in every
    checkpoint, so a token left in `hub_token` would be written to disk in plain text. In `HF_TOKEN` it stays in
    memory, and every Hub call of the run (model and dataset downloads, the final push) still uses it.

    Args:
        training_args:
            The recipe's `AlignmentConfig`; its `hub_token` is set to `None`.

    Returns:
        `bool`: whether a token was moved.
    """
    token = getattr(training_args, "hub_token", None)
    if not token:
        return False
    os.environ["HF_TOKEN"] = token
    training_args.hub_token = None
    logger.info(
        "--hub_token was moved to this process's HF_TOKEN environment variable so that it is not saved in "
        "training_args.bin; `hf auth login` or exporting HF_TOKEN avoids passing it on the command line."
    )
    return True


def check_launch(training_args, model_args, script_args) -> None:
    """
    Errors that must come before any model is loaded: a push without a repository id, and a quantized model under
    DeepSpeed ZeRO-3 (bitsandbytes weights cannot be partitioned). Also takes a `--hub_token` out of the training
    arguments before anything can save them (see [`keep_hub_token_off_disk`]).
    """
    keep_hub_token_off_disk(training_args)
    check_hub_settings(training_args.push_to_hub, training_args.hub_model_id)
    if (model_args.load_in_4bit or model_args.load_in_8bit) and deepspeed_zero_stage() == 3:
        raise ValueError(
            "load_in_4bit/load_in_8bit cannot be combined with DeepSpeed ZeRO-3: quantized weights cannot be "
            "partitioned. Use a ZeRO-2 or DDP accelerate config for QLoRA, or drop the quantization."
        )
    if not script_args.eval_only and not model_args.use_peft:
        raise ValueError(
            "The recipes train LoRA adapters (the paper's setup, and what is evaluated and pushed): pass --use_peft "
            "(the shipped configs do)."
        )


def check_zero3_partitioning(trainer) -> None:
    """
    Fail before training when ZeRO-3 would not partition a single parameter of the model.

    DeepSpeed keeps every tensor with at most `stage3_param_persistence_threshold` elements whole on each process.
    With a threshold above the model's largest tensor (TRL's stock `zero3.yaml` with a small model), ZeRO-3
    silently runs unpartitioned, which hides partitioning bugs and wastes the memory it was chosen to save.
    """
    if deepspeed_zero_stage(trainer.accelerator) != 3:
        return
    plugin = trainer.accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config.get("zero_optimization", {})
    threshold = config.get("stage3_param_persistence_threshold", 100_000)
    if threshold == "auto":
        threshold = 10 * trainer.model.config.get_text_config().hidden_size
    largest = max(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters())
    if largest <= int(threshold):
        raise ValueError(
            f"DeepSpeed ZeRO-3 would partition no parameter of this model: its largest tensor has {largest} elements "
            f"and stage3_param_persistence_threshold is {threshold}, so every tensor stays whole on every process. "
            "Lower stage3_param_persistence_threshold below that size (0 partitions everything; see "
            "recipes/accelerate_configs/zero3.yaml), or use ZeRO-2 for a model this small."
        )


def _trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return sorted(((n, p) for n, p in model.named_parameters() if p.requires_grad), key=lambda item: item[0])


def rank_checksum(model, zero3: bool) -> dict:
    """
    Fingerprint of the trainable parameters this process holds: a SHA-256 over names and values, and float64 sums
    (plain, absolute, squared) that can be compared with a saved adapter whatever its key names.
    """
    params = _trainable_parameters(model)
    if zero3:
        import deepspeed

        context = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
    else:
        import contextlib

        context = contextlib.nullcontext()
    digest = hashlib.sha256()
    total = absolute = squares = 0.0
    numel = 0
    with context:
        for name, param in params:
            values = param.detach().to("cpu", torch.float32).contiguous()
            digest.update(name.encode())
            digest.update(values.numpy().tobytes())
            values64 = values.double()
            total += values64.sum().item()
            absolute += values64.abs().sum().item()
            squares += values64.square().sum().item()
            numel += values.numel()
    record = {"sha256": digest.hexdigest(), "sum": total, "abs_sum": absolute, "sq_sum": squares, "numel": numel}
    if zero3:  # parameters of which this process holds only a shard: proof that ZeRO-3 really partitions
        shards = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
        record["partitioned_parameters"] = sum(p.ds_tensor.numel() < p.ds_numel for p in shards)
        record["parameters"] = len(shards)
    return record


def check_rank_weights(trainer, output_dir: str) -> dict:
    """
    Compare the trainable weights of every process after training; write `rank_checksums.json`; fail if they differ.
    """
    from accelerate.utils import gather_object

    model = trainer.accelerator.unwrap_model(trainer.model)
    record = rank_checksum(model, zero3=deepspeed_zero_stage(trainer.accelerator) == 3)
    record["rank"] = trainer.accelerator.process_index
    records = gather_object([record]) if trainer.accelerator.num_processes > 1 else [record]
    summary = {
        "num_processes": trainer.accelerator.num_processes,
        "identical": len({r["sha256"] for r in records}) == 1,
        "ranks": records,
    }
    if trainer.accelerator.is_main_process:
        with open(os.path.join(output_dir, RANK_CHECKSUMS_FILE), "w") as f:
            json.dump(summary, f, indent=2)
    if not summary["identical"]:
        raise RuntimeError(
            f"The processes ended training with different trainable weights (see {RANK_CHECKSUMS_FILE}); the saved "
            "adapter is only rank 0's. This points to a bug in the launch or trainer: please report it."
        )
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
def evaluate_examples(
    model,
    tokenizer,
    examples: Sequence[dict],
    score: Callable[[list[str], list[str], str], dict[str, float]],
    *,
    task: str,
    run: str,
    main_metric: str,
    output_dir: str,
    max_new_tokens: int,
    batch_size: int,
    language_groups: dict[str, list[str]],
    zero3: bool = False,
    compare_with: str | None = None,
    extra: dict | None = None,
) -> dict | None:
    """
    Generate an answer for every example (split over the processes), score each language, and write the results,
    the predictions and the plot into `output_dir` (main process).

    Args:
        model:
            The (unwrapped) model to generate with; under ZeRO-3 every process must take part.
        tokenizer:
            Its tokenizer.
        examples (`Sequence[dict]`):
            Each with `language`, `prompt` (plain or chat messages) and `reference`; other keys are kept in the
            predictions file.
        score (`Callable[[list[str], list[str], str], dict[str, float]]`):
            `score(predictions, references, language)` for one language's examples.
        task, run, main_metric (`str`):
            Recorded in the results (`run` is `"aligned"` or `"baseline"`).
        output_dir (`str`):
            Where the files go.
        max_new_tokens, batch_size (`int`):
            Generation settings.
        language_groups (`dict[str, list[str]]`):
            Groups of languages averaged in the report (task, aligned, transfer).
        zero3 (`bool`, *optional*, defaults to `False`):
            Whether the model is partitioned by DeepSpeed ZeRO-3.
        compare_with (`str`, *optional*):
            Another run's results, drawn next to this run in the plot.
        extra (`dict`, *optional*):
            More fields for the results JSON.

    Returns:
        `dict | None`: the results on the main process, `None` on the others.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    indexed = [dict(example, index=i) for i, example in enumerate(examples)]
    with state.split_between_processes(indexed, apply_padding=True) as shard:
        predictions = generate_completions(
            model,
            tokenizer,
            [example["prompt"] for example in shard],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            synced_gpus=zero3 and state.num_processes > 1,
            desc=f"Evaluating {task} (process {state.process_index})",
            disable_progress=not state.is_local_main_process,
        )
        records = [dict(example, prediction=p) for example, p in zip(shard, predictions)]
    if state.num_processes > 1:
        records = gather_object(records)
    if not state.is_main_process:
        return None
    by_index = {}
    for record in records:  # padding repeats the last example: keep the first copy of each
        by_index.setdefault(record["index"], record)
    records = [by_index[i] for i in range(len(examples))]

    languages: dict[str, dict] = {}
    for lang in dict.fromkeys(r["language"] for r in records):
        subset = [r for r in records if r["language"] == lang]
        scores = score([r["prediction"] for r in subset], [r["reference"] for r in subset], lang)
        languages[lang] = {**scores, "num_examples": len(subset)}
    results = {"task": task, "run": run, "main_metric": main_metric, "languages": languages, **(extra or {})}
    results["language_groups"] = {k: [lang for lang in v if lang in languages] for k, v in language_groups.items()}
    results["groups"] = summarize_groups(results, {**results["language_groups"], "all": list(languages)})
    for record in records:
        if not isinstance(record["prompt"], str):
            record["prompt"] = record["prompt"][-1]["content"]
    write_results(results, output_dir, predictions=records)
    runs = {run: results}
    if compare_with:
        other = load_results(compare_with)
        label = other.get("run", "other")
        # The label is drawn into the plot, which may be pushed: the folder's name, never a local path
        runs = {label if label != run else f"{label} ({public_name(compare_with)})": other, run: results}
        if "baseline" in runs:  # baseline first, whichever run is plotted
            runs = {"baseline": runs.pop("baseline"), **runs}
    try:
        plot_results(runs, os.path.join(output_dir, PLOT_FILE), metric=main_metric)
    except ImportError as error:
        logger.warning(f"No plot: {error}")
    return results


def language_groups(
    eval_languages: Sequence[str], train_languages: Sequence[str], alignment_languages: Sequence[str]
) -> dict[str, list[str]]:
    """Split evaluated languages into those with task data, those with alignment pairs only, and the rest."""
    train, aligned = set(train_languages), set(alignment_languages)
    return {
        "task": [lang for lang in eval_languages if lang in train],
        "aligned": [lang for lang in eval_languages if lang not in train and lang in aligned],
        "transfer": [lang for lang in eval_languages if lang not in train and lang not in aligned],
    }


def load_adapter_for_eval(script_args, training_args, model_args):
    """Load the base model and the adapter at `adapter_path` (default `output_dir`) for `--eval_only`."""
    from accelerate import PartialState
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = script_args.adapter_path or training_args.output_dir
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(
            f"--eval_only: no adapter at {path} (adapter_config.json missing). Pass --adapter_path to a saved "
            "adapter, or train first."
        )
    kwargs = model_init_kwargs(training_args, model_args)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    base = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    model = PeftModel.from_pretrained(base, path).to(PartialState().device)
    tokenizer_path = (
        path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else model_args.model_name_or_path
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Hub
def align_settings(trainer) -> dict | None:
    """The `align_*` settings of an aligned run and its resolved layer; `None` for the baseline."""
    if not hasattr(trainer, "align_layer"):
        return None
    settings = {k: getattr(trainer.args, k) for k in sorted(vars(trainer.args)) if k.startswith("align_")}
    settings["resolved_align_layer"] = f"{trainer.align_layer} of {trainer.num_layers}"
    return settings


def write_card_and_push(
    output_dir: str,
    training_args,
    model_args,
    script_args,
    task: str,
    results: dict | None,
    alignment_languages: Sequence[str],
    settings: dict | None,
    datasets: Sequence[str],
) -> str | None:
    """Write the model card into `output_dir` and, with `--push_to_hub`, upload the run (main process only)."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return None
    plots = ([PLOT_FILE] if os.path.isfile(os.path.join(output_dir, PLOT_FILE)) else []) + find_probe_plots(output_dir)
    training_settings = {
        "learning_rate": training_args.learning_rate,
        "lr_scheduler_type": str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)),
        "warmup_steps": training_args.warmup_steps,
        "num_train_epochs": training_args.num_train_epochs,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "lora_r": model_args.lora_r,
        "lora_alpha": model_args.lora_alpha,
        "lora_dropout": model_args.lora_dropout,
        "lora_target_modules": model_args.lora_target_modules,
    }
    card = model_card(
        base_model=model_args.model_name_or_path,
        task=task,
        train_languages=script_args.train_languages,
        alignment_languages=list(alignment_languages),
        align_settings=settings,
        results=results,
        datasets=[d for d in datasets if d],
        training_settings=training_settings,
        plots=plots,
        repo_id=training_args.hub_model_id,
    )
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(card)
    if not training_args.push_to_hub:
        return None
    url = push_folder(
        output_dir,
        training_args.hub_model_id,
        private=training_args.hub_private_repo,
        token=training_args.hub_token,  # None after keep_hub_token_off_disk: HF_TOKEN or the login is used
        revision=training_args.hub_revision,
        extra_files=[plot for plot in plots if plot != PLOT_FILE],  # PLOT_FILE is one of hub.PUSH_FILES
    )
    logger.info(f"Pushed {output_dir} to {url}")
    return url


# ----------------------------------------------------------------------------------------------------------------------
# The shared second half of every recipe: train (or load), check, evaluate, card, push
def train_evaluate_push(
    task: str,
    script_args: RecipeArguments,
    training_args,
    model_args,
    tokenizer,
    train_dataset: Dataset | None,
    pair_dataset: Dataset | None,
    eval_examples: Sequence[dict],
    score: Callable[[list[str], list[str], str], dict[str, float]],
    main_metric: str,
    alignment_languages: Sequence[str],
    groups: dict[str, list[str]],
    datasets: Sequence[str],
) -> dict | None:
    """
    Train with `AlignmentTrainer` (or `trl.SFTTrainer` for the baseline), save, check the processes agree, evaluate,
    write the model card and push, in that order. With `eval_only`, load the saved adapter and evaluate it.

    Returns:
        `dict | None`: the evaluation results on the main process.
    """
    from trl import SFTTrainer, get_peft_config

    from trl_midalign import AlignmentTrainer

    output_dir = training_args.output_dir
    push = training_args.push_to_hub
    settings = None
    if script_args.eval_only:
        if push and os.path.abspath(script_args.adapter_path or output_dir) != os.path.abspath(output_dir):
            raise ValueError(
                "--eval_only with --push_to_hub pushes output_dir: keep the adapter there (no --adapter_path)."
            )
        model, tokenizer = load_adapter_for_eval(script_args, training_args, model_args)
        zero3, trainer = False, None
        settings_path = os.path.join(script_args.adapter_path or output_dir, "alignment_settings.json")
        if os.path.isfile(settings_path):
            with open(settings_path) as f:
                settings = json.load(f)
    else:
        training_args.model_init_kwargs = model_init_kwargs(training_args, model_args)
        # The recipe pushes once, at the end, with its own model card: keep Trainer from pushing at every save
        training_args.push_to_hub = False
        trainer_kwargs = dict(
            model=model_args.model_name_or_path,
            args=training_args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
        )
        if script_args.alignment:
            trainer = AlignmentTrainer(**trainer_kwargs, alignment_dataset=pair_dataset)
        else:
            trainer = SFTTrainer(**trainer_kwargs)
        check_zero3_partitioning(trainer)

        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.accelerator.print("Training completed.")
        trainer.save_model(output_dir)
        settings = align_settings(trainer)
        if trainer.accelerator.is_main_process:
            with open(os.path.join(output_dir, "alignment_settings.json"), "w") as f:
                json.dump(settings, f, indent=2, default=str)
        if script_args.check_ranks:
            check_rank_weights(trainer, output_dir)
        model = trainer.accelerator.unwrap_model(trainer.model)
        zero3 = deepspeed_zero_stage(trainer.accelerator) == 3

    results = evaluate_examples(
        model,
        tokenizer,
        eval_examples,
        score,
        task=task,
        run="aligned" if settings is not None else "baseline",
        main_metric=main_metric,
        output_dir=output_dir,
        max_new_tokens=script_args.max_new_tokens,
        batch_size=training_args.per_device_eval_batch_size,
        language_groups=groups,
        zero3=zero3,
        compare_with=script_args.compare_with,
        extra={
            "model": public_name(model_args.model_name_or_path),  # eval_results.json is pushed: no local path
            "train_languages": list(script_args.train_languages),
            "alignment_languages": list(alignment_languages),
        },
    )
    training_args.push_to_hub = push
    write_card_and_push(
        output_dir, training_args, model_args, script_args, task, results, alignment_languages, settings, datasets
    )
    end_processes(trainer)
    return results


# Gloo's worker threads drop the objects of a collective just after it completes, and may need the GIL to do so. A
# process that reaches interpreter shutdown before they have aborts ("terminate called without an active exception",
# exit code -6) although its work is done. `python benchmarks/exit_race.py`: a 2-process Gloo program that ends
# right after all_gather_object and destroy_process_group aborted in 4 of 50 launches; with a barrier and this pause,
# in 0 of 50.
EXIT_PAUSE_SECONDS = 0.5


def end_processes(trainer=None) -> None:
    """
    End a run on every process together: wait for the others, destroy the process groups (through `trainer.end()`,
    which also closes the trackers), then pause briefly so the communication threads finish before Python shuts down.
    """
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        state.wait_for_everyone()
    if trainer is not None:
        trainer.end()
    else:
        state.destroy_process_group()
    if state.num_processes > 1:
        time.sleep(EXIT_PAUSE_SECONDS)
