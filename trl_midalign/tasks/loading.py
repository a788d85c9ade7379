"""Loading the rows of a task and its alignment pairs, from the Hub or from local files, as the recipes need them.

Local files are read by [`~trl_midalign.local_files.load_rows`] (the one loader of local data); Hub datasets by
`datasets.load_dataset`, one configuration per language when the configuration holds a `{lang}` placeholder.
Alignment pairs are checked by [`~trl_midalign.data.check_pairs`], the one policy for a bad pair.
"""

import os
from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset

from ..local_files import load_rows
from .languages import iso_code


PAIR_COLUMNS = ("parallel_source", "parallel_target")


def is_local(name: str | None) -> bool:
    """Whether a dataset name is a local path (else a Hub id)."""
    return bool(name) and os.path.exists(name)


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


def select_split(dataset: DatasetDict, split: str, source: str) -> Dataset:
    """`dataset[split]` of a Hub dataset, with the splits it has and the fix when it lacks `split`."""
    if split in dataset:
        return dataset[split]
    raise ValueError(
        f"{source} has no split {split!r} (its splits: {list(dataset)}). Set --dataset_train_split / "
        "--dataset_test_split, or give a folder with one file per split (train.jsonl, test.jsonl)."
    )


def load_split(
    name: str, config: str | None, split: str, revision: str | None = None, option: str = "--dataset_name"
) -> Dataset:
    """
    One split of a dataset: a local file or folder read by [`~trl_midalign.local_files.load_rows`], or a Hub dataset.

    A single local file with a `partition` column (MASSIVE's own release keeps every split in one file, `"dev"` for
    the validation split) gives the rows of that partition.

    Args:
        name (`str`):
            Hub dataset id or local path.
        config (`str`, *optional*):
            Hub configuration.
        split (`str`):
            The split to load.
        revision (`str`, *optional*):
            Hub revision.
        option (`str`, *optional*, defaults to `"--dataset_name"`):
            The argument that named the data, for error messages.

    Returns:
        [`~datasets.Dataset`]: the rows of the split.
    """
    if not is_local(name):
        return select_split(load_hub(name, config, revision), split, name)
    if os.path.isfile(name):
        rows = load_rows(name, option=option)
        if "partition" in rows.column_names:
            wanted = {"validation": "dev"}.get(split, split)
            return rows.filter(lambda partition: partition == wanted, input_columns="partition")
        if split != "train":  # let load_rows explain that a single file holds only the train split
            return load_rows(name, split=split, option=option)
        return rows
    return load_rows(name, split=split, option=option)


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
    if not is_local(name) and config and "{" in config:
        if languages is None:
            raise ValueError(
                f"{name} is loaded one configuration per language ({config!r}), so the languages must be listed "
                "(--train_languages / --eval_languages)."
            )
        parts = []
        for lang in languages:
            part = load_split(name, config.format(**config_values(lang)), split, revision)
            if language_column in part.column_names:
                part = part.remove_columns(language_column)
            parts.append(part.add_column(language_column, [lang] * len(part)))
        return concatenate_datasets(parts) if parts else Dataset.from_dict({language_column: []})
    dataset = load_split(name, config, split, revision)
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


def require_columns(dataset: Dataset, columns: Sequence[str], source: str, fix: str) -> None:
    """
    Fail naming every column of `columns` that `dataset` lacks, its actual columns and the fix.

    Args:
        dataset ([`~datasets.Dataset`]):
            The data.
        columns (`Sequence[str]`):
            Columns the task needs.
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


def as_task_row(prompt: str, completion: str, conversational: bool) -> dict:
    """A TRL prompt-completion row: chat messages for a model with a chat template, plain strings otherwise."""
    if conversational:
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": completion}],
        }
    return {"prompt": prompt + "\n", "completion": completion}


# ----------------------------------------------------------------------------------------------------------------------
# Alignment pairs
def pairs_from_lists(
    sources: Sequence[str], targets: Sequence[str], language: str, max_pairs: int | None = None
) -> Dataset:
    """
    The pairs (non-English `sources`, English `targets`) of one language as a pair dataset, the first `max_pairs` of
    them, checked by [`~trl_midalign.data.check_pairs`] (an empty or non-string side is refused, naming the row).

    Returns:
        [`~datasets.Dataset`]: columns `parallel_source`, `parallel_target` and `language`.
    """
    from ..data import check_pairs

    count = len(sources) if max_pairs is None else min(max_pairs, len(sources))
    pairs = Dataset.from_dict(
        {
            PAIR_COLUMNS[0]: list(sources[:count]),
            PAIR_COLUMNS[1]: list(targets[:count]),
            "language": [language] * count,
        }
    )
    check_pairs(pairs, *PAIR_COLUMNS, name=f"{language} alignment pairs")
    return pairs


def pairs_from_rows(rows: Dataset, languages: Sequence[str], language_column: str, max_pairs: int | None) -> Dataset:
    """
    Alignment pairs carried by the task rows themselves (columns `parallel_source`/`parallel_target`), for the given
    languages of `language_column`.
    """
    parts = []
    for language in languages:
        part = rows.filter(lambda x, language=language: x == language, input_columns=language_column)
        if len(part) == 0:
            raise ValueError(
                f"No {language} row of the training data has a parallel pair; check --alignment_languages."
            )
        parts.append(pairs_from_lists(part[PAIR_COLUMNS[0]], part[PAIR_COLUMNS[1]], language, max_pairs))
    return concatenate_datasets(parts)


def load_pair_dataset(args: Any, languages: Sequence[str], seed: int) -> Dataset:
    """
    Load the alignment pairs of `languages` from `args.alignment_dataset_name`, mixed across languages.

    Accepted layouts: columns `parallel_source` and `parallel_target` (filtered on the language column when the data
    has one), or a `translation` column of `{language code: sentence}` dicts from which each alignment language is
    paired with `args.alignment_pivot_language`.

    Args:
        args ([`~trl_midalign.scripts.RecipeArguments`]):
            The recipe's arguments (`alignment_dataset_name`, `alignment_dataset_config`, `alignment_dataset_split`,
            `alignment_pivot_language`, `language_column`, `max_alignment_pairs`).
        languages (`Sequence[str]`):
            The alignment languages.
        seed (`int`):
            Seed of the shuffle that mixes the languages.

    Returns:
        [`~datasets.Dataset`]: columns `parallel_source` (the non-English side), `parallel_target` and `language`.
    """
    name, config, split = args.alignment_dataset_name, args.alignment_dataset_config, args.alignment_dataset_split
    if not languages:
        raise ValueError("--alignment_dataset_name needs --alignment_languages: the languages whose pairs to use.")
    option = "--alignment_dataset_name"
    if not is_local(name) and config and "{" in config:
        sources = [(lang, load_split(name, config.format(lang=lang), split, option=option)) for lang in languages]
    else:
        sources = [(None, load_split(name, config, split, option=option))]
    pivot, limit = args.alignment_pivot_language, args.max_alignment_pairs
    parts: dict[str, Dataset] = {}
    for lang, data in sources:
        if all(c in data.column_names for c in PAIR_COLUMNS):
            if lang is None and args.language_column in data.column_names:
                parts.update(
                    (language, pairs_from_rows(data, [language], args.language_column, limit))
                    for language in languages
                )
            elif lang is None and len(languages) > 1:
                raise ValueError(
                    f"{name} has pairs but no language column {args.language_column!r} to tell the "
                    f"{len(languages)} alignment languages apart; add the column or pass one language."
                )
            else:
                language = lang or languages[0]
                parts[language] = pairs_from_lists(data[PAIR_COLUMNS[0]], data[PAIR_COLUMNS[1]], language, limit)
        elif "translation" in data.column_names:
            for language in [lang] if lang else languages:
                rows = [r for r in data["translation"] if r and r.get(language) and r.get(pivot)]
                if not rows:
                    raise ValueError(
                        f"{name} has no {language}-{pivot} pairs; check --alignment_languages and the data."
                    )
                parts[language] = pairs_from_lists(
                    [r[language] for r in rows], [r[pivot] for r in rows], language, limit
                )
        else:
            raise ValueError(
                f"The alignment dataset {name} lacks the columns {list(PAIR_COLUMNS)} and a 'translation' column (its "
                f"columns: {data.column_names}). Give it parallel_source (non-English) and parallel_target (English) "
                "columns, or WMT-style translation dicts."
            )
    return concatenate_datasets(list(parts.values())).shuffle(seed=seed)


def default_eval_languages(args: Any, alignment_languages: Sequence[str]) -> list[str] | None:
    """
    The languages to evaluate: `args.eval_languages`; else, for Hub data loaded one configuration per language, the
    task and alignment languages; else `None` (every language of local test data).
    """
    if args.eval_languages is None and not is_local(args.eval_dataset_name or args.dataset_name):
        return list(dict.fromkeys([*args.train_languages, *alignment_languages]))
    return args.eval_languages


def resolve_alignment_languages(args: Any) -> list[str]:
    """
    The alignment languages of a run: `[]` for the baseline or `--eval_only`; those given; else, for local task
    data that supplies its own pairs, every language of its training split but the pivot (English).
    """
    if not args.alignment or args.eval_only:
        return []
    if args.alignment_languages:
        return list(args.alignment_languages)
    if args.alignment_dataset_name or not is_local(args.dataset_name):
        raise ValueError(
            "Name the languages to align with --alignment_languages (e.g. sw,te,is), or run the baseline with "
            "--alignment false."
        )
    train = load_split(args.dataset_name, None, args.dataset_train_split)
    if args.language_column not in train.column_names:
        raise ValueError(
            f"The training data has no language column {args.language_column!r}; set --language_column or "
            "--alignment_languages."
        )
    pivot = iso_code(args.alignment_pivot_language)
    languages = sorted(lang for lang in set(train.unique(args.language_column)) if iso_code(lang) != pivot)
    if not languages:
        raise ValueError(
            "The training data has no language besides the pivot to align; pass --alignment_languages with "
            "--alignment_dataset_name, or --alignment false."
        )
    return languages
