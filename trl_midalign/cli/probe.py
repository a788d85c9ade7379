"""`trl-midalign probe`: probe a model on parallel pairs, write `probe.json` and the plots, print the table."""

import os
import re
from dataclasses import dataclass, field

import torch

from ..local_files import EXTENSIONS, load_rows
from ..losses import POOLINGS, PoolingMode
from ..modeling import load_causal_lm, load_tokenizer
from ..probing.plots import pyplot
from ..probing.probe import MEAN, ProbeResult, group_pairs, probe_groups


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_DTYPES = ("auto", "float32", "bfloat16", "float16")


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
            Maximum tokens per sentence.
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
    max_length: int = field(default=128, metadata={"help": "Maximum tokens per sentence; longer ones are truncated."})
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
            "choices": list(_DTYPES),
        },
    )
    device: str | None = field(
        default=None, metadata={"help": "Device to run on (e.g. 'cpu', 'cuda:0'); 'cuda' when available, else 'cpu'."}
    )
    plot: bool = field(default=True, metadata={"help": "Write the heatmap and curve PNGs (needs matplotlib)."})

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1.")
        if self.max_length < 1:
            raise ValueError(f"max_length={self.max_length} must be at least 1.")
        if self.max_pairs_per_language is not None and self.max_pairs_per_language < 2:
            raise ValueError(
                f"max_pairs_per_language={self.max_pairs_per_language}: retrieval needs at least 2 pairs per "
                "language; pass a value >= 2 or leave it out."
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {list(_DTYPES)}.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: choose one of {list(POOLINGS)}.")


def _is_hub_id(path: str) -> bool:
    return bool(_HUB_ID.fullmatch(path)) and not path.startswith(".")


def _load_pairs(args: ProbeArguments):
    """The pairs of `--data`: a local file or folder through [`load_rows`], else a dataset of the Hub."""
    path = args.data
    if os.path.exists(path) or os.path.splitext(path)[1].lower() in EXTENSIONS or not _is_hub_id(path):
        columns = {args.source_column: "--source_column", args.target_column: "--target_column"}
        return load_rows(path, args.data_split, columns, "--data", row_name="pair")
    import datasets

    try:
        return datasets.load_dataset(path, split=args.data_split)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise FileNotFoundError(
            f"--data {path!r} does not exist as a local file and is not a dataset datasets.load_dataset can load "
            f"({error}). Pass a JSONL file with one pair per row (language, parallel_source, parallel_target)."
        ) from error


def _load_model_and_tokenizer(path: str, dtype: str, device: str):
    if not os.path.exists(path) and (path.lower().endswith(".gguf") or not _is_hub_id(path)):
        raise FileNotFoundError(
            f"--model_name_or_path {path!r} does not exist. Pass a directory holding a transformers causal LM "
            "(config.json and weights), a .gguf file, or a Hub model id."
        )
    if dtype == "auto":
        torch_dtype = torch.float32 if device == "cpu" else "auto"
    else:
        torch_dtype = getattr(torch, dtype)
    try:
        model = load_causal_lm(path, dtype=torch_dtype)
        tokenizer = load_tokenizer(path)
    except FileNotFoundError:
        raise
    except OSError as error:  # for example a Hub id that cannot be reached
        raise FileNotFoundError(f"Could not load a causal LM and its tokenizer from {path!r}: {error}") from error
    return model.to(device), tokenizer


def run_probe(args: ProbeArguments) -> ProbeResult:
    """
    Run `trl-midalign probe`: probe a model on parallel pairs, write `probe.json` and the plots into
    `args.output_dir`, and print the table and the recommended layer.

    Args:
        args ([`ProbeArguments`]):
            The command's arguments.

    Returns:
        [`ProbeResult`]: The probe result that was written.
    """
    if args.plot:
        pyplot()  # fail before the slow part when matplotlib is missing
    groups = group_pairs(
        _load_pairs(args),
        source_column=args.source_column,
        target_column=args.target_column,
        language_column=args.language_column,
        languages=args.languages,
        max_pairs_per_language=args.max_pairs_per_language,
        name=f"pairs of {args.data}",
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = _load_model_and_tokenizer(args.model_name_or_path, args.dtype, device)
    num_pairs = sum(len(sources) for sources, _ in groups.values())
    print(f"Probing {args.model_name_or_path} on {num_pairs} pairs in {len(groups)} language(s) ({device}).")
    result = probe_groups(
        model,
        tokenizer,
        groups,
        batch_size=args.batch_size,
        max_length=args.max_length,
        pooling=args.pooling,
        model_name=args.model_name_or_path,
    )
    written = [result.to_json(os.path.join(args.output_dir, "probe.json"))]
    if args.plot:
        written += result.plot(args.output_dir)
    layer = result.recommended_layer
    accuracy = result.retrieval_accuracy[MEAN][result.layers.index(layer)]
    print()
    print(f"Retrieval accuracy of {args.pooling}-pooled states per layer (0 = embeddings; * = recommended):")
    print(result.to_markdown())
    print()
    print(
        f"Recommended layer: {layer} of {result.layers[-1]} (mean retrieval accuracy {accuracy:.3f}); "
        f"use it with align_layer={layer}"
        + (f" and align_pooling='{args.pooling}'." if args.pooling != "mean" else ".")
    )
    print("Wrote " + ", ".join(written))
    return result
