"""Text classification as label likelihood, MASSIVE-intent style: the prompt asks for the label of a text, the
completion is the label's name, and evaluation picks the label of least completion NLL over the whole label set
(exact, no generation; [`~trl_midalign.tasks.report.label_log_likelihoods`]).

The default data is MASSIVE's intents (`utt`, `intent` as a ClassLabel, `locale`); local data (JSON/JSONL/parquet
files or a folder with train/dev/test files) names its text, label and language columns.
"""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from datasets import ClassLabel, Dataset

from .arguments import RecipeArguments
from .loading import as_task_row, require_columns


NAME = "classification"
MAIN_METRIC = "accuracy"
PROMPT = "Which of these labels fits the text best: {labels}?\nText: {text}"


@dataclass
class ClassificationArguments(RecipeArguments):
    """
    The arguments of `recipes/classification.py`: those of [`~trl_midalign.tasks.arguments.RecipeArguments`] with
    MASSIVE's intent defaults, plus the columns and the prompt.

    Parameters:
        text_column (`str`, *optional*, defaults to `"utt"`):
            Column with the text to classify.
        label_column (`str`, *optional*, defaults to `"intent"`):
            Column with the label: a name, or an integer of a `ClassLabel` feature (MASSIVE's `intent`).
        labels (`list[str]`, *optional*):
            The label set; default: the `ClassLabel` names, else every label of the training and test rows (sorted).
        prompt_template (`str`, *optional*):
            The prompt, with `{text}` and optionally `{labels}` (the label set, comma-separated).
    """

    dataset_name: str | None = field(
        default="AmazonScience/massive",
        metadata={"help": "MASSIVE on the Hub, or a local file/folder with text, label and language columns."},
    )
    dataset_config: str | None = field(
        default="{lang}", metadata={"help": "Hub configuration; '{lang}' loads one MASSIVE locale at a time."}
    )
    language_column: str = field(default="locale", metadata={"help": "Column with each row's language."})
    train_languages: list[str] = field(
        default_factory=lambda: ["en-US"], metadata={"help": "Languages of the task training data."}
    )
    alignment_pivot_language: str = field(
        default="en-US", metadata={"help": "Language of the English side of the alignment pairs."}
    )
    text_column: str = field(default="utt", metadata={"help": "Column with the text to classify."})
    label_column: str = field(
        default="intent", metadata={"help": "Column with the label (a name, or a ClassLabel integer)."}
    )
    labels: list[str] | None = field(
        default=None,
        metadata={"help": "The label set; default: the ClassLabel names, else the labels of the train and test rows."},
    )
    prompt_template: str = field(
        default=PROMPT, metadata={"help": "The prompt, with {text} and optionally {labels} (the label set)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.labels, str):
            self.labels = [part.strip() for part in self.labels.split(",") if part.strip()]
        if "{text}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{text}}', got {self.prompt_template!r}.")


def label_names(rows: Dataset, label_column: str) -> list[str]:
    """The label of each row as a string: a `ClassLabel` integer becomes its name."""
    feature = rows.features.get(label_column)
    values = rows[label_column]
    if isinstance(feature, ClassLabel):
        return [feature.int2str(int(v)) for v in values]
    return [str(v) for v in values]


def label_set(datasets: Sequence[Dataset], label_column: str) -> list[str]:
    """The label set of the data: the `ClassLabel` names of the first dataset that has them, else the sorted labels."""
    for rows in datasets:
        feature = rows.features.get(label_column)
        if isinstance(feature, ClassLabel):
            return list(feature.names)
    return sorted({label for rows in datasets for label in label_names(rows, label_column)})


def _prompt(template: str, text: str, labels: Sequence[str]) -> str:
    return template.replace("{labels}", ", ".join(labels)).replace("{text}", text)


def _check(rows: Dataset, args: ClassificationArguments, labels: Sequence[str], what: str) -> list[str]:
    require_columns(
        rows, [args.text_column, args.label_column], what, "Point --text_column / --label_column at your columns."
    )
    names = label_names(rows, args.label_column)
    unknown = sorted(set(names) - set(labels))
    if unknown:
        raise ValueError(f"{what} has labels {unknown[:5]} outside the label set {list(labels)}; fix --labels.")
    return names


def examples(rows: Dataset, args: ClassificationArguments, labels: Sequence[str], conversational: bool) -> list[dict]:
    """Evaluation examples (`language`, `prompt`, `reference` = the label name) of classification rows."""
    names = _check(rows, args, labels, "The evaluation data")
    return [
        {
            "language": lang,
            "prompt": as_task_row(_prompt(args.prompt_template, text, labels), "", conversational)["prompt"],
            "reference": name,
        }
        for text, name, lang in zip(rows[args.text_column], names, rows[args.language_column])
    ]


def train_dataset(
    rows: Dataset, args: ClassificationArguments, labels: Sequence[str], conversational: bool
) -> Dataset:
    """TRL prompt-completion rows (the completion is the label name) with a `language` column."""
    names = _check(rows, args, labels, "The training data")
    return Dataset.from_list(
        [
            {**as_task_row(_prompt(args.prompt_template, text, labels), name, conversational), "language": lang}
            for text, name, lang in zip(rows[args.text_column], names, rows[args.language_column])
        ]
    )


def score(
    predictions: Sequence[str], references: Sequence[str], language: str, labels: Sequence[str] | None = None
) -> dict[str, float]:
    """
    Scores of one language's predicted labels.

    Returns:
        `dict[str, float]`: `accuracy`; `majority_baseline`, the accuracy of always answering the most frequent
        reference label of these rows (the best constant answer: a model at or below it has not learned the task);
        `chance`, one over the number of labels (of `labels`, else of the labels seen here); and
        `majority_prediction_share`, the share of the most frequent prediction (near 1: the model answers one label).
    """
    if len(predictions) != len(references) or not references:
        raise ValueError(f"Got {len(predictions)} predictions for {len(references)} references ({language}).")
    n = len(references)
    return {
        "accuracy": sum(p == r for p, r in zip(predictions, references)) / n,
        "majority_baseline": Counter(references).most_common(1)[0][1] / n,
        "chance": 1 / len(labels or set(references) | set(predictions)),
        "majority_prediction_share": Counter(predictions).most_common(1)[0][1] / n,
    }
