"""The command-line arguments shared by the recipes of the tasks: data, languages, alignment pairs and evaluation
([`RecipeArguments`], which each task subclasses with its defaults), and the paper's LoRA ([`RecipeModelConfig`])."""

from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig


PAPER_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
            Hub dataset id, or a local path: a `.jsonl`/`.json`/`.csv`/`.tsv`/`.parquet` file, a folder of such files
            named after their splits (`train.jsonl`, `test.jsonl`), or a folder written by `save_to_disk` (read by
            [`~trl_midalign.local_files.load_rows`]).
        dataset_config (`str`, *optional*):
            Hub dataset configuration; `{lang}` in it is replaced by each language, loading one configuration per
            language (e.g. `"{lang}"` for MASSIVE's per-locale configurations).
        dataset_revision (`str`, *optional*):
            Hub revision, e.g. `"refs/convert/parquet"` for a dataset whose loading script `datasets` no longer runs.
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split with the task training rows.
        dataset_test_split (`str`, *optional*, defaults to `"test"`):
            Split evaluated after training.
        dataset_dev_split (`str`, *optional*):
            Split of development rows (MASSIVE: `"validation"`; a local folder: its `dev` file), in the training
            languages, tokenized as the training rows and passed to the trainer as `eval_dataset`: with
            `--eval_strategy steps --load_best_model_at_end --metric_for_best_model eval_loss` the checkpoint of least
            task dev loss is kept. Unset: no dev evaluation during training.
        max_dev_samples (`int`, *optional*):
            Keep at most this many dev rows per training language.
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
        max_generate_samples (`int`, *optional*):
            Generate answers, and compute the task's metrics from them, for at most this many of each language's
            evaluation rows (the first ones); `reference_loss` still uses every evaluated row. Generation is the slow
            part of an evaluation: e.g. chrF on 64 rows and the reference loss on 256. A classification task, which
            scores every row by label likelihood, generates nothing and ignores it.
        max_new_tokens (`int`, *optional*, defaults to `64`):
            Maximum generated tokens per evaluation example.
        eval_only (`bool`, *optional*, defaults to `False`):
            Skip training; evaluate the adapter at `adapter_path`.
        adapter_path (`str`, *optional*):
            Adapter evaluated with `eval_only`; defaults to `output_dir`.
        compare_with (`str`, *optional*):
            Results of another run (its output_dir or `eval_results.json`), drawn next to this run's in the plot, e.g.
            the baseline when this is the aligned run.
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
    dataset_dev_split: str | None = field(
        default=None,
        metadata={
            "help": "Dev split (e.g. 'validation' for MASSIVE, 'dev' for a local folder) in the training languages, "
            "passed as eval_dataset: with --eval_strategy steps --load_best_model_at_end --metric_for_best_model "
            "eval_loss the checkpoint of least task dev loss is kept."
        },
    )
    max_dev_samples: int | None = field(
        default=None, metadata={"help": "Keep at most this many dev rows per training language."}
    )
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
        metadata={
            "help": "Train with the alignment loss (AlignmentTrainer); false: the SFT baseline (LabelsOnlySFTTrainer: SFTTrainer "
            "with the same task loss as AlignmentTrainer's task steps)."
        },
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
    max_generate_samples: int | None = field(
        default=None,
        metadata={
            "help": "Generate answers (and the task's metrics) for at most this many evaluation rows per language, "
            "the first ones; reference_loss uses every evaluated row. Unset: all."
        },
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

    def __post_init__(self):
        for name in ("train_languages", "eval_languages", "alignment_languages"):
            setattr(self, name, _split_list(getattr(self, name)))
        if not self.dataset_name:
            raise ValueError("dataset_name is required: a Hub dataset id or a local file/folder.")
        for name in (
            "max_alignment_pairs", "max_train_samples", "max_eval_samples", "max_dev_samples", "max_generate_samples"
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or unset for all rows), got {value}.")

    @property
    def eval_name(self) -> str:
        """The dataset evaluated: `eval_dataset_name`, else `dataset_name`."""
        return self.eval_dataset_name or self.dataset_name


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
