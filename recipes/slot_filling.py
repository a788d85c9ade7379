# /// script
# dependencies = [
#     "trl-midalign",
#     "matplotlib",
# ]
# ///
"""
Slot filling on MASSIVE as generation, with middle-layer alignment (Liu & Niehues, 2025) or as the SFT baseline.

The model reads a voice-assistant request and answers with its slots, `"slot: span; slot: span"`, or `"None"`. It is
trained on a few languages and evaluated on many with span-level slot F1 and exact match. Alignment pairs are
MASSIVE's own parallel utterances (the same `id` in another locale and in en-US) unless `--alignment_dataset_name`
gives others.

# Aligned run (8 GPUs, DeepSpeed ZeRO-2)
```bash
accelerate launch --config_file recipes/accelerate_configs/zero2.yaml recipes/slot_filling.py \
    --config recipes/configs/slot_filling_llama3_8b.yaml
```

# Baseline with the same settings
```bash
accelerate launch --config_file recipes/accelerate_configs/zero2.yaml recipes/slot_filling.py \
    --config recipes/configs/slot_filling_llama3_8b.yaml --alignment false --output_dir Llama-3-8B-MASSIVE-baseline
```

# Local data
Any JSON lines file with MASSIVE's fields works, e.g. the official release's `data/*.jsonl` (a `partition` column
tells the splits apart) or a folder with `train.jsonl` and `test.jsonl`:
```bash
python recipes/slot_filling.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name massive/1.1/data \
    --train_languages en-US --use_peft --output_dir out
```
"""

import re
from dataclasses import dataclass, field

from _common import (
    RecipeArguments,
    RecipeModelConfig,
    as_task_row,
    cap_per_language,
    check_languages,
    check_launch,
    is_local,
    language_groups,
    load_language_rows,
    load_pair_dataset,
    pairs_from_lists,
    parse_args,
    require_columns,
    resolve_alignment_languages,
    train_evaluate_push,
)
from datasets import Dataset, concatenate_datasets

from trl_midalign.evaluation import format_slots, slot_scores


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
_SLOT = re.compile(r"\[\s*([^:\]]+?)\s*:\s*([^\]]*?)\s*\]")


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


@dataclass
class SlotFillingArguments(RecipeArguments):
    """
    Arguments of the slot-filling recipe: those of `RecipeArguments` with MASSIVE's defaults (per-locale
    configurations, `locale` column, en-US as the English side of the pairs).
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


def massive_pairs(script_args: SlotFillingArguments, languages: list[str]) -> Dataset:
    """Alignment pairs from MASSIVE itself: each utterance of an alignment locale with the en-US utterance of its id."""
    pivot = script_args.alignment_pivot_language
    rows = load_language_rows(
        script_args.dataset_name,
        script_args.dataset_config,
        script_args.dataset_train_split,
        [*languages, pivot],
        script_args.language_column,
        script_args.dataset_revision,
    )
    require_columns(
        rows,
        ["id", "utt"],
        script_args.dataset_name,
        "MASSIVE rows are parallel across locales through their 'id'; without it, give --alignment_dataset_name.",
    )
    english = {i: u for i, u, lang in zip(rows["id"], rows["utt"], rows[script_args.language_column]) if lang == pivot}
    parts = []
    for language in languages:
        pairs = [
            (utt, english[i])
            for i, utt, lang in zip(rows["id"], rows["utt"], rows[script_args.language_column])
            if lang == language and i in english
        ]
        if not pairs:
            raise ValueError(
                f"No {language} utterance shares an id with a {pivot} one; these locales cannot be paired."
            )
        parts.append(pairs_from_lists([s for s, _ in pairs], [t for _, t in pairs], language, script_args))
    return concatenate_datasets(parts)


def main(script_args: SlotFillingArguments, training_args, model_args):
    from transformers import AutoTokenizer

    check_launch(training_args, model_args, script_args)
    for option in ("train_languages", "eval_languages", "alignment_languages"):
        check_languages(getattr(script_args, option) or [], MASSIVE_LOCALES, f"--{option}", "MASSIVE locale")
    check_languages([script_args.alignment_pivot_language], MASSIVE_LOCALES, "--alignment_pivot_language")
    lang_column = script_args.language_column
    columns_fix = "Use MASSIVE's fields (utt: the request, annot_utt: it with [slot : span] brackets)."

    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    conversational = tokenizer.chat_template is not None

    alignment_languages = resolve_alignment_languages(script_args)

    # Evaluation examples
    eval_languages = script_args.eval_languages
    if eval_languages is None and not is_local(script_args.eval_dataset_name or script_args.dataset_name):
        eval_languages = list(dict.fromkeys([*script_args.train_languages, *alignment_languages]))
    test = load_language_rows(
        script_args.eval_dataset_name or script_args.dataset_name,
        script_args.eval_dataset_config or script_args.dataset_config,
        script_args.dataset_test_split,
        eval_languages,
        lang_column,
        script_args.dataset_revision,
    )
    require_columns(test, ["utt", "annot_utt"], "The evaluation data", columns_fix)
    test = cap_per_language(test, lang_column, script_args.max_eval_samples)
    eval_languages = list(dict.fromkeys(test[lang_column]))
    examples = [
        {
            "language": row[lang_column],
            "prompt": as_task_row(PROMPT.format(utterance=row["utt"]), "", conversational)["prompt"],
            "reference": format_slots(slots_of(row["annot_utt"])),
        }
        for row in test
    ]

    # Training rows and alignment pairs
    train_dataset = pair_dataset = None
    if not script_args.eval_only:
        train = load_language_rows(
            script_args.dataset_name,
            script_args.dataset_config,
            script_args.dataset_train_split,
            script_args.train_languages,
            lang_column,
            script_args.dataset_revision,
        )
        require_columns(train, ["utt", "annot_utt"], "The training data", columns_fix)
        train = cap_per_language(train, lang_column, script_args.max_train_samples)
        train_dataset = Dataset.from_list(
            [
                {
                    **as_task_row(
                        PROMPT.format(utterance=row["utt"]), format_slots(slots_of(row["annot_utt"])), conversational
                    ),
                    "language": row[lang_column],
                }
                for row in train
            ]
        )
        if script_args.alignment:
            if script_args.alignment_dataset_name:
                script_args.alignment_languages = alignment_languages
                pair_dataset = load_pair_dataset(script_args, seed=training_args.seed)
            else:
                pair_dataset = massive_pairs(script_args, alignment_languages).shuffle(seed=training_args.seed)

    return train_evaluate_push(
        "slot_filling",
        script_args,
        training_args,
        model_args,
        tokenizer,
        train_dataset,
        pair_dataset,
        examples,
        lambda predictions, references, language: slot_scores(predictions, references),
        "slot_f1",
        alignment_languages,
        language_groups(eval_languages, script_args.train_languages, alignment_languages),
        [script_args.dataset_name, script_args.alignment_dataset_name],
    )


def make_parser():
    from trl import TrlParser

    from trl_midalign import AlignmentConfig

    return TrlParser((SlotFillingArguments, AlignmentConfig, RecipeModelConfig))


if __name__ == "__main__":
    script_args, training_args, model_args = parse_args(make_parser())
    main(script_args, training_args, model_args)
