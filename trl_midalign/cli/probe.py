"""`trl-midalign probe`: probe a model on parallel pairs, write `probe.json` and the plots, print the table."""

import os
import re

import torch

from ..checkpoints import check_output_dir
from ..data import check_identical_sides
from ..local_files import EXTENSIONS, load_rows
from ..modeling import load_causal_lm, load_tokenizer
from ..probing.arguments import ProbeArguments
from ..probing.plots import pyplot
from ..probing.probe import MEAN, ProbeResult, group_pairs, no_recommendation_reason, probe_groups


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


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
        tokenizer = load_tokenizer(path)  # first: a folder without tokenizer files is refused before the model loads
        model = load_causal_lm(path, dtype=torch_dtype)
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
    check_output_dir(args.output_dir, "--output_dir")
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
    # Pairs whose sides are the same text score 1.0 at every layer: no layer choice can come from them
    sources = [sentence for group, _ in groups.values() for sentence in group]
    targets = [sentence for _, group in groups.values() for sentence in group]
    check_identical_sides(
        sources, targets, args.source_column, args.target_column, f"The {len(sources)} pairs of {args.data}"
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
    print()
    print(f"Retrieval accuracy of {args.pooling}-pooled states per layer (0 = embeddings; * = recommended):")
    print(result.to_markdown())
    print()
    if layer is None:
        print("Wrote " + ", ".join(written))
        raise SystemExit(f"trl-midalign probe: error: {no_recommendation_reason(result)}")
    accuracy = result.retrieval_accuracy[MEAN][result.layers.index(layer)]
    print(
        f"Recommended layer: {layer} of {result.layers[-1]} (mean retrieval accuracy {accuracy:.3f}); "
        f"use it with align_layer={layer}"
        + (f" and align_pooling='{args.pooling}'." if args.pooling != "mean" else ".")
    )
    print("Wrote " + ", ".join(written))
    return result
