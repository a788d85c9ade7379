# /// script
# dependencies = [
#     "trl-midalign",
#     "matplotlib",
# ]
# ///
"""
Named entities as JSON (Universal NER style), with middle-layer alignment (Liu & Niehues, 2025) or as the SFT
baseline, evaluated per language with entity F1 and the rate of valid JSON.

The model reads a sentence and answers with `{"person": [...], "organization": [...], "location": [...]}`. Data:
Universal NER rows (`tokens` and BIO `ner_tags`, as class labels or strings), one Hub configuration per treebank
(`en_ewt`, `de_pud`, ...), or a local file with a language column. Alignment pairs come from
`--alignment_dataset_name`, or from `parallel_source`/`parallel_target` columns of the training rows.

# Aligned run (8 GPUs, DeepSpeed ZeRO-2)
```bash
accelerate launch --config_file recipes/accelerate_configs/zero2.yaml recipes/structured_generation.py \
    --config recipes/configs/structured_generation_qwen2.5_7b.yaml
```

# Baseline with the same settings
```bash
accelerate launch --config_file recipes/accelerate_configs/zero2.yaml recipes/structured_generation.py \
    --config recipes/configs/structured_generation_qwen2.5_7b.yaml --alignment false --output_dir Qwen2.5-7B-UNER-baseline
```
"""

from dataclasses import dataclass, field

from _common import (
    LANGUAGE_NAMES,
    RecipeArguments,
    RecipeModelConfig,
    as_task_row,
    cap_per_language,
    check_languages,
    check_launch,
    is_local,
    iso_code,
    language_groups,
    load_language_rows,
    load_pair_dataset,
    pairs_from_rows,
    parse_args,
    require_columns,
    resolve_alignment_languages,
    train_evaluate_push,
)
from datasets import ClassLabel, Dataset

from trl_midalign.evaluation import entity_scores, format_entities


UNER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
TYPE_NAMES = {"PER": "person", "ORG": "organization", "LOC": "location"}
PROMPT = (
    'Find the named entities in the text. Answer with a JSON object with the keys "person", "organization" and '
    '"location", each a list of the entity strings as they appear in the text.\nText: {text}'
)
# Scripts written without spaces between words: their tokens are joined without a space
_NO_SPACE = {"zh", "ja", "th", "lo", "km", "my", "yue"}


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


@dataclass
class StructuredGenerationArguments(RecipeArguments):
    """
    Arguments of the structured-generation recipe: those of `RecipeArguments`, where languages are Universal NER
    treebanks (`en_ewt`, `de_pud`, ...) or plain language codes in local data.

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


def _tag_names(dataset: Dataset, script_args: StructuredGenerationArguments) -> list[str] | None:
    inner = getattr(dataset.features["ner_tags"], "feature", None)
    if isinstance(inner, ClassLabel):
        return inner.names
    return script_args.tag_names or UNER_LABELS


def examples_of(dataset: Dataset, script_args, language_column: str) -> list[dict]:
    """Text and gold entities of each row."""
    names = _tag_names(dataset, script_args)
    rows = []
    for row in dataset:
        tags = [names[t] if isinstance(t, int) else str(t) for t in row["ner_tags"]]
        joiner = "" if iso_code(row[language_column]) in _NO_SPACE else " "
        rows.append(
            {
                "language": row[language_column],
                "text": joiner.join(row["tokens"]),
                "answer": format_entities(entities_from_bio(row["tokens"], tags, joiner)),
            }
        )
    return rows


def english_languages(script_args: StructuredGenerationArguments) -> list[str]:
    """The English languages (`en`, `en_ewt`, ...) of a local training split, the default task languages."""
    train = load_language_rows(
        script_args.dataset_name, None, script_args.dataset_train_split, None, script_args.language_column
    )
    pivot = iso_code(script_args.alignment_pivot_language)
    languages = sorted(lang for lang in set(train[script_args.language_column]) if iso_code(lang) == pivot)
    if not languages:
        raise ValueError("The training data has no English rows; name the task languages with --train_languages.")
    return languages


def main(script_args: StructuredGenerationArguments, training_args, model_args):
    from transformers import AutoTokenizer

    check_launch(training_args, model_args, script_args)
    if script_args.train_languages is None:
        script_args.train_languages = (
            english_languages(script_args) if is_local(script_args.dataset_name) else ["en_ewt"]
        )
    for option in ("train_languages", "eval_languages", "alignment_languages"):
        codes = getattr(script_args, option) or []
        for code in codes:
            check_languages([iso_code(code)], LANGUAGE_NAMES, f"--{option} ({code})")
    lang_column = script_args.language_column
    columns_fix = "Give each row 'tokens' (words) and 'ner_tags' (BIO tags such as B-PER, as strings or class labels)."

    alignment_languages = resolve_alignment_languages(script_args)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    conversational = tokenizer.chat_template is not None

    # Evaluation examples
    eval_name = script_args.eval_dataset_name or script_args.dataset_name
    eval_languages = script_args.eval_languages
    if eval_languages is None and not is_local(eval_name):
        eval_languages = list(dict.fromkeys([*script_args.train_languages, *alignment_languages]))
    test = load_language_rows(
        eval_name,
        script_args.eval_dataset_config or script_args.dataset_config,
        script_args.dataset_test_split,
        eval_languages,
        lang_column,
        script_args.dataset_revision,
    )
    require_columns(test, ["tokens", "ner_tags"], "The evaluation data", columns_fix)
    test = cap_per_language(test, lang_column, script_args.max_eval_samples)
    eval_languages = list(dict.fromkeys(test[lang_column]))
    examples = [
        {
            "language": row["language"],
            "prompt": as_task_row(PROMPT.format(text=row["text"]), "", conversational)["prompt"],
            "reference": row["answer"],
        }
        for row in examples_of(test, script_args, lang_column)
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
        require_columns(train, ["tokens", "ner_tags"], "The training data", columns_fix)
        train = cap_per_language(train, lang_column, script_args.max_train_samples)
        train_dataset = Dataset.from_list(
            [
                {
                    **as_task_row(PROMPT.format(text=row["text"]), row["answer"], conversational),
                    "language": row["language"],
                }
                for row in examples_of(train, script_args, lang_column)
            ]
        )
        if script_args.alignment:
            if script_args.alignment_dataset_name:
                script_args.alignment_languages = alignment_languages
                pair_dataset = load_pair_dataset(script_args, seed=training_args.seed)
            else:
                rows = load_language_rows(
                    script_args.dataset_name,
                    script_args.dataset_config,
                    script_args.dataset_train_split,
                    alignment_languages,
                    lang_column,
                    script_args.dataset_revision,
                )
                pair_dataset = pairs_from_rows(rows, alignment_languages, script_args)
                if pair_dataset is None:
                    raise ValueError(
                        "Universal NER has no parallel sentences: give alignment pairs with --alignment_dataset_name "
                        "(columns parallel_source/parallel_target or translation dicts), or add parallel_source/"
                        "parallel_target columns to the training rows, or run the baseline with --alignment false."
                    )
                pair_dataset = pair_dataset.shuffle(seed=training_args.seed)

    return train_evaluate_push(
        "structured_generation",
        script_args,
        training_args,
        model_args,
        tokenizer,
        train_dataset,
        pair_dataset,
        examples,
        lambda predictions, references, language: entity_scores(predictions, references),
        "entity_f1",
        alignment_languages,
        # Treebanks count by their language: en_pud is a task language when en_ewt is, de_pud aligned with "de" pairs
        language_groups(
            eval_languages,
            [lang for lang in eval_languages if iso_code(lang) in {iso_code(t) for t in script_args.train_languages}],
            [lang for lang in eval_languages if iso_code(lang) in {iso_code(a) for a in alignment_languages}],
        ),
        [script_args.dataset_name, script_args.alignment_dataset_name],
    )


def make_parser():
    from trl import TrlParser

    from trl_midalign import AlignmentConfig

    return TrlParser((StructuredGenerationArguments, AlignmentConfig, RecipeModelConfig))


if __name__ == "__main__":
    script_args, training_args, model_args = parse_args(make_parser())
    main(script_args, training_args, model_args)
