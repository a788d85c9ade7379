"""The arguments of `trl-midalign probe` ([`ProbeArguments`]), parsed by [`~trl_midalign.parser.MidAlignParser`]."""

from dataclasses import dataclass, field

from ..losses import POOLINGS, PoolingMode


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ProbeArguments:
    r"""
    Arguments of `trl-midalign probe`.

    Args:
        model_name_or_path (`str`):
            Directory of a transformers causal LM, a `.gguf` file, or a Hub model id.
        data (`str`):
            Parallel pairs: a JSONL/JSON/CSV/TSV/Parquet file, a directory saved with `Dataset.save_to_disk`, or
            anything `datasets.load_dataset` accepts.
        output_dir (`str`):
            Where to write `probe.json`, `probe_heatmap.png` and `probe_curve.png`.
        languages (`list[str]` or `None`, *optional*, defaults to `None`):
            Languages to probe; all languages of the data when not given.
        max_pairs_per_language (`int` or `None`, *optional*, defaults to `None`):
            Probe only the first this many pairs of each language.
        batch_size (`int`, *optional*, defaults to `32`):
            Sentences per forward pass.
        max_length (`int`, *optional*, defaults to `128`):
            Maximum tokens per sentence, at least 2.
        pooling (`str`, *optional*, defaults to `"mean"`):
            How a sentence's token states are pooled: `"mean"`, `"mean_no_special"` or `"last"` (as `align_pooling`).
        source_column (`str`, *optional*, defaults to `"parallel_source"`):
            Column with the non-English sentence.
        target_column (`str`, *optional*, defaults to `"parallel_target"`):
            Column with its (English) translation.
        language_column (`str`, *optional*, defaults to `"language"`):
            Column with the language code of the pair.
        data_split (`str`, *optional*, defaults to `"train"`):
            Split to read when `data` holds several.
        dtype (`str`, *optional*, defaults to `"auto"`):
            `"auto"`, `"float32"`, `"bfloat16"` or `"float16"`.
        device (`str` or `None`, *optional*, defaults to `None`):
            Device to run on; `"cuda"` when available, else `"cpu"`.
        plot (`bool`, *optional*, defaults to `True`):
            Write the PNG plots (needs matplotlib).
    """

    model_name_or_path: str = field(
        metadata={"help": "Directory of a transformers causal LM, a .gguf file, or a Hub model id."}
    )
    data: str = field(
        metadata={
            "help": "Parallel pairs, one per row: a JSONL/JSON/CSV/TSV/Parquet file, a directory saved with "
            "Dataset.save_to_disk, or anything datasets.load_dataset accepts."
        }
    )
    output_dir: str = field(metadata={"help": "Directory for probe.json, probe_heatmap.png and probe_curve.png."})
    languages: list[str] | None = field(
        default=None, metadata={"help": "Languages to probe (space separated); all languages of the data if omitted."}
    )
    max_pairs_per_language: int | None = field(
        default=None, metadata={"help": "Probe only the first N pairs of each language (at least 2)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Sentences per forward pass."})
    max_length: int = field(
        default=128, metadata={"help": "Maximum tokens per sentence (at least 2); longer ones are truncated."}
    )
    pooling: PoolingMode = field(
        default="mean",
        metadata={
            "help": "How a sentence's token states are pooled, as align_pooling in training: 'mean' over the tokens, "
            "'mean_no_special' (without special tokens such as BOS) or 'last' (the last token)."
        },
    )
    source_column: str = field(
        default="parallel_source", metadata={"help": "Column with the source (non-English) sentence."}
    )
    target_column: str = field(
        default="parallel_target", metadata={"help": "Column with the target (English) sentence."}
    )
    language_column: str = field(
        default="language",
        metadata={"help": "Column with the language of each pair; without it all pairs form one group 'all'."},
    )
    data_split: str = field(default="train", metadata={"help": "Split to read when the data has several."})
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Model dtype: 'auto' (float32 on CPU, the checkpoint's dtype on GPU), 'float32', 'bfloat16' or "
            "'float16'. Cosine similarities are always computed in float32.",
            "choices": list(DTYPES),
        },
    )
    device: str | None = field(
        default=None, metadata={"help": "Device to run on (e.g. 'cpu', 'cuda:0'); 'cuda' when available, else 'cpu'."}
    )
    plot: bool = field(default=True, metadata={"help": "Write the heatmap and curve PNGs (needs matplotlib)."})

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1.")
        if self.max_length < 2:
            raise ValueError(
                f"max_length={self.max_length}: a sentence needs at least 2 tokens (with a BOS token, 1 token leaves "
                "every sentence the same), as align_max_length in training. Pass --max_length 2 or more (default 128)."
            )
        if self.max_pairs_per_language is not None and self.max_pairs_per_language < 2:
            raise ValueError(
                f"max_pairs_per_language={self.max_pairs_per_language}: retrieval needs at least 2 pairs per "
                "language; pass a value >= 2 or leave it out."
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {list(DTYPES)}.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: choose one of {list(POOLINGS)}.")
