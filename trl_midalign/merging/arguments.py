"""The arguments of `trl-midalign merge` ([`MergeArguments`]), parsed by [`~trl_midalign.parser.MidAlignParser`]."""

from dataclasses import dataclass, field

from .merge import Combination


@dataclass
class MergeArguments:
    r"""
    Arguments of `trl-midalign merge`.

    Parameters:
        > Merge

        base_model_name_or_path (`str` or `None`, *optional*, defaults to `None`):
            Base model directory or Hub id; `None` uses the one the adapters record.
        adapters (`list[str]`):
            Required. Adapters as `name=path`, for example `task=out/task-lora alignment=out/align-lora`.
        weights (`list[float]` or `None`, *optional*, defaults to `None`):
            One weight per adapter, in the order of `adapters`; `None` gives every adapter 1.0.
        combination (`str`, *optional*, defaults to `"cat"`):
            `"cat"`, `"svd"` or `"linear"`, see [`merge_adapters`].
        svd_rank (`int` or `None`, *optional*, defaults to `None`):
            Rank of the merged adapter for `combination="svd"`.
        output_dir (`str` or `None`, *optional*, defaults to `None`):
            Where to save the merged adapter (or model) and its model card. Required unless `search` only prints.
            It must not be, be inside or contain any input (adapters, base model, dev files).
        merge_into_base (`bool`, *optional*, defaults to `False`):
            Save a full model with the merged adapter folded into the base weights.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace the contents of an existing, non-empty `output_dir`.

        > Weight search

        search (`bool`, *optional*, defaults to `False`):
            Choose the weight of `search_adapter` with [`search_merge_weights`] before merging.
        search_adapter (`str`, *optional*, defaults to `"alignment"`):
            Adapter whose weight is searched.
        search_weights (`list[float]`, *optional*, defaults to `[0.0, 0.25, 0.5, 0.75, 1.0]`):
            Weights to try (0 is always added as the reference).
        dev_file (`str` or `None`, *optional*, defaults to `None`):
            Dev task rows (json/jsonl/csv/parquet). Required with `search`.
        pairs_file (`str` or `None`, *optional*, defaults to `None`):
            Parallel pairs for the retrieval score; `None` reads them from `dev_file`.
        align_layer (`str` or `None`, *optional*, defaults to `None`):
            Layer to score; `None` infers it from the searched adapter's `layers_to_transform`.
        max_task_loss_increase (`float`, *optional*, defaults to `0.05`):
            Largest allowed relative rise of the dev task loss over weight 0.
        batch_size (`int`, *optional*, defaults to `8`):
            Rows per forward pass during the search.
        max_length (`int`, *optional*, defaults to `512`):
            Maximum tokens per dev row or sentence.
        source_column (`str`, *optional*, defaults to `"parallel_source"`):
            Pair column with the non-English sentence.
        target_column (`str`, *optional*, defaults to `"parallel_target"`):
            Pair column with its translation.
        language_column (`str`, *optional*, defaults to `"language"`):
            Pair column with the language (optional in the data).
    """

    base_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Base model directory or Hub id. Defaults to the base_model_name_or_path the adapters record."
        },
    )
    adapters: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Required. Adapters to combine as name=path, for example: task=out/task-lora "
            "alignment=out/align-lora."
        },
    )
    weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight per adapter, in the order of --adapters (negative subtracts). Default: 1.0 each."
        },
    )
    combination: Combination = field(
        default="cat",
        metadata={
            "help": "How to combine: 'cat' (exact weighted sum of the deltas, rank = sum of ranks), 'svd' (truncated to "
            "--svd_rank) or 'linear' (averages the LoRA factors; only for adapters with a shared initialisation)."
        },
    )
    svd_rank: int | None = field(
        default=None,
        metadata={"help": "Rank of the merged adapter for --combination svd. Default: the largest input rank."},
    )
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "Required (unless --search only prints the weight table). Directory for the merged adapter (or "
            "model) and its README.md model card; it must not be, be inside or contain any input."
        },
    )
    merge_into_base: bool = field(
        default=False,
        metadata={"help": "Fold the merged adapter into the base weights and save a full model."},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "Replace the contents of an existing, non-empty --output_dir."},
    )
    search: bool = field(
        default=False,
        metadata={
            "help": "Before merging, try every weight of --search_weights for --search_adapter on the dev set and keep "
            "the one with the highest retrieval accuracy at the aligned layer whose dev task loss is at most "
            "--max_task_loss_increase above weight 0. Prints the table."
        },
    )
    search_adapter: str = field(
        default="alignment",
        metadata={"help": "Name (in --adapters) of the adapter whose weight --search chooses."},
    )
    search_weights: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        metadata={"help": "Weights tried by --search (0 is always added as the reference)."},
    )
    dev_file: str | None = field(
        default=None,
        metadata={
            "help": "Required with --search. Dev task rows (a JSONL/JSON/CSV/TSV/Parquet file or a saved dataset "
            "folder): prompt+completion, text or messages."
        },
    )
    pairs_file: str | None = field(
        default=None,
        metadata={"help": "Parallel pairs for the retrieval score of --search. Default: read them from --dev_file."},
    )
    align_layer: str | None = field(
        default=None,
        metadata={
            "help": "Layer scored by --search ('middle', an int, a negative int or a fraction). Default: one above the "
            "highest block the searched adapter changes (its layers_to_transform), else the middle layer."
        },
    )
    max_task_loss_increase: float = field(
        default=0.05,
        metadata={
            "help": "Largest relative rise of the dev task loss over weight 0 that --search accepts (0.05 = 5%%)."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Rows per forward pass during --search."})
    max_length: int = field(default=512, metadata={"help": "Maximum tokens per dev row or sentence during --search."})
    source_column: str = field(
        default="parallel_source", metadata={"help": "Pair column with the non-English sentence."}
    )
    target_column: str = field(default="parallel_target", metadata={"help": "Pair column with its translation."})
    language_column: str = field(
        default="language", metadata={"help": "Pair column with the language of the pair (optional in the data)."}
    )

    def missing_options(self) -> list[str]:
        """The required options that are not set (the CLI reports them as a usage error)."""
        missing = []
        if not self.adapters:
            missing.append("--adapters NAME=PATH [NAME=PATH ...]")
        if self.output_dir is None and not self.search:
            missing.append("--output_dir DIR (or --search with --dev_file to only print the weight table)")
        if self.search and self.dev_file is None:
            missing.append("--dev_file FILE (with --search)")
        return missing
