# /// script
# dependencies = [
#     "trl-midalign",
#     "sacrebleu",
#     "matplotlib",
# ]
# ///
"""
LLM translation fine-tuning with ALMA-style prompts, with middle-layer alignment (Liu & Niehues, 2025) or as the SFT
baseline, evaluated per direction with BLEU and chrF (and COMET with `--comet_model` when `unbabel-comet` is
installed).

Data: rows with a `translation` column of `{language code: sentence}` dicts, the layout of ALMA's training data
(`haoranxu/ALMA-Human-Parallel`, one configuration per pair such as `de-en`) and of the WMT test sets. A direction
`de-en` uses every row that has both a `de` and an `en` sentence. The alignment pairs are the training pairs
themselves (each non-English sentence with its English side) unless `--alignment_dataset_name` gives others.

# Aligned run (8 GPUs, DeepSpeed ZeRO-2)
```bash
accelerate launch --config_file recipes/accelerate_configs/zero2.yaml recipes/translation.py \
    --config recipes/configs/translation_llama3_8b.yaml
```

# Baseline with the same settings
```bash
accelerate launch --config_file recipes/accelerate_configs/zero2.yaml recipes/translation.py \
    --config recipes/configs/translation_llama3_8b.yaml --alignment false --output_dir Llama-3-8B-ALMA-baseline
```
"""

from dataclasses import dataclass, field

from _common import (
    LANGUAGE_NAMES,
    RecipeArguments,
    RecipeModelConfig,
    as_task_row,
    check_languages,
    check_launch,
    is_local,
    language_groups,
    load_hub,
    load_local,
    load_pair_dataset,
    pairs_from_lists,
    parse_args,
    require_columns,
    select_split,
    train_evaluate_push,
)
from datasets import Dataset, concatenate_datasets

from trl_midalign.evaluation import translation_scores


DEFAULT_TEST_SET = "haoranxu/WMT23-Test"
PROMPT = "Translate this from {source_name} to {target_name}:\n{source_name}: {text}\n{target_name}:"


@dataclass
class TranslationArguments(RecipeArguments):
    """
    Arguments of the translation recipe: those of `RecipeArguments`, where the "languages" of the task and of the
    evaluation are translation directions (`source-target`, e.g. `de-en`), plus COMET settings.

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
    dataset_test_split: str = field(default="test", metadata={"help": "Split evaluated after training."})
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
    """`"de-en"` -> `("de", "en")`, failing clearly on anything else."""
    parts = direction.split("-")
    if len(parts) != 2 or not all(parts):
        raise ValueError(
            f"{option}: {direction!r} is not a translation direction; write it as source-target, e.g. de-en."
        )
    for code in parts:
        check_languages([code], LANGUAGE_NAMES, option, "language code")
    return parts[0], parts[1]


def direction_rows(name: str, config: str | None, split: str, direction: str, args: TranslationArguments) -> Dataset:
    """The rows of one direction: Hub data loaded with the direction's configuration, local data filtered."""
    source, target = direction.split("-")
    if is_local(name):
        data = select_split(load_local(name), split, name)
    else:
        lang = source if target == args.alignment_pivot_language else target
        resolved = config.format(lang=lang, src=source, tgt=target) if config else None
        data = select_split(load_hub(name, resolved, args.dataset_revision), split, name)
    require_columns(
        data,
        [args.translation_column],
        name,
        "Give each row a translation dict such as {'de': '...', 'en': '...'}, or set --translation_column.",
    )
    keep = [i for i, row in enumerate(data[args.translation_column]) if row and row.get(source) and row.get(target)]
    if not keep:
        raise ValueError(f"{name} ({split}) has no row with both a {source!r} and a {target!r} sentence.")
    rows = data.select(keep)[args.translation_column]
    return Dataset.from_dict(
        {
            "source": [r[source] for r in rows],
            "target": [r[target] for r in rows],
            "direction": [direction] * len(rows),
        }
    )


def _cap(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def main(script_args: TranslationArguments, training_args, model_args):
    from transformers import AutoTokenizer

    check_launch(training_args, model_args, script_args)
    pivot = script_args.alignment_pivot_language
    train_directions = list(script_args.train_languages)
    for direction in train_directions:
        split_direction(direction, "--train_languages")
    eval_directions = script_args.eval_languages or train_directions
    for direction in eval_directions:
        split_direction(direction, "--eval_languages")
    check_languages(script_args.alignment_languages or [], LANGUAGE_NAMES, "--alignment_languages")
    eval_name = script_args.eval_dataset_name or (
        script_args.dataset_name if is_local(script_args.dataset_name) else DEFAULT_TEST_SET
    )
    eval_config = script_args.eval_dataset_config or (
        "{src}-{tgt}" if eval_name == DEFAULT_TEST_SET else script_args.dataset_config
    )

    alignment_languages: list[str] = []
    if script_args.alignment and not script_args.eval_only:
        default = [d.split("-")[0] if d.split("-")[1] == pivot else d.split("-")[1] for d in train_directions]
        alignment_languages = script_args.alignment_languages or [
            lang for lang in dict.fromkeys(default) if lang != pivot
        ]
        if not alignment_languages:
            raise ValueError(
                "No alignment language: pass --alignment_languages, or --alignment false for the baseline."
            )

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    conversational = tokenizer.chat_template is not None

    def prompt(source_text: str, direction: str) -> str:
        source, target = direction.split("-")
        return PROMPT.format(source_name=LANGUAGE_NAMES[source], target_name=LANGUAGE_NAMES[target], text=source_text)

    # Evaluation examples, per direction
    examples = []
    for direction in eval_directions:
        rows = direction_rows(eval_name, eval_config, script_args.dataset_test_split, direction, script_args)
        rows = _cap(rows, script_args.max_eval_samples)
        for row in rows:
            examples.append(
                {
                    "language": direction,
                    "prompt": as_task_row(prompt(row["source"], direction), "", conversational)["prompt"],
                    "reference": row["target"],
                    "source": row["source"],
                }
            )

    # Training rows and alignment pairs
    train_dataset = pair_dataset = None
    if not script_args.eval_only:
        by_direction = {
            d: _cap(
                direction_rows(
                    script_args.dataset_name,
                    script_args.dataset_config,
                    script_args.dataset_train_split,
                    d,
                    script_args,
                ),
                script_args.max_train_samples,
            )
            for d in train_directions
        }
        train_dataset = Dataset.from_list(
            [
                {**as_task_row(prompt(row["source"], d), row["target"], conversational), "language": d}
                for d, rows in by_direction.items()
                for row in rows
            ]
        )
        if script_args.alignment:
            if script_args.alignment_dataset_name:
                script_args.alignment_languages = alignment_languages
                pair_dataset = load_pair_dataset(script_args, seed=training_args.seed)
            else:
                parts = []
                for lang in alignment_languages:
                    pairs = {}
                    for d, rows in by_direction.items():
                        source, target = d.split("-")
                        if (source, target) == (lang, pivot):
                            pairs.update(zip(rows["source"], rows["target"]))
                        elif (source, target) == (pivot, lang):
                            pairs.update(zip(rows["target"], rows["source"]))
                    if not pairs:
                        raise ValueError(
                            f"--alignment_languages {lang}: no training direction pairs {lang} with {pivot}, so the task "
                            "rows hold no such pairs. Add the direction, or give --alignment_dataset_name."
                        )
                    parts.append(pairs_from_lists(list(pairs), list(pairs.values()), lang, script_args))
                pair_dataset = concatenate_datasets(parts).shuffle(seed=training_args.seed)

    def score(predictions, references, direction):
        sources = [e["source"] for e in examples if e["language"] == direction]
        target = direction.split("-")[1]
        return translation_scores(
            predictions, references, target_language=target, sources=sources, comet_model=script_args.comet_model
        )

    aligned_directions = [d for d in eval_directions if set(d.split("-")) & set(alignment_languages)]
    return train_evaluate_push(
        "translation",
        script_args,
        training_args,
        model_args,
        tokenizer,
        train_dataset,
        pair_dataset,
        examples,
        score,
        "chrf",
        alignment_languages,
        language_groups(eval_directions, train_directions, aligned_directions),
        [script_args.dataset_name, eval_name, script_args.alignment_dataset_name],
    )


def make_parser():
    from trl import TrlParser

    from trl_midalign import AlignmentConfig

    return TrlParser((TranslationArguments, AlignmentConfig, RecipeModelConfig))


if __name__ == "__main__":
    script_args, training_args, model_args = parse_args(make_parser())
    main(script_args, training_args, model_args)
