"""`trl-midalign merge`: an optional weight search, then [`merge_adapters`]; prints the search table."""

from collections.abc import Sequence

from ..local_files import load_rows
from ..merging.arguments import MergeArguments
from ..merging.merge import merge_adapters, prepare_merge
from ..merging.search import format_search_table, search_merge_weights
from ..model_card import update_card


USAGE = (
    "trl-midalign merge --adapters NAME=PATH [NAME=PATH ...] --output_dir DIR [options]\n"
    "       trl-midalign merge --adapters NAME=PATH [NAME=PATH ...] --search --dev_file FILE [--output_dir DIR] "
    "[options]"
)


def _parse_named_paths(items: Sequence[str]) -> dict[str, str]:
    if not items:
        raise ValueError(
            "--adapters is required: give the adapters as name=path, for example task=PATH alignment=PATH."
        )
    adapters = {}
    for item in items:
        name, separator, path = item.partition("=")
        if not separator or not name or not path:
            raise ValueError(
                f"--adapters entry {item!r} is not name=path; write it as, for example, task=out/task-lora."
            )
        if name in adapters:
            raise ValueError(f"--adapters names {name!r} twice; give each adapter its own name.")
        adapters[name] = path
    return adapters


def run_merge(args: MergeArguments) -> None:
    """Runs `trl-midalign merge`: optional weight search, then [`merge_adapters`]; see [`MergeArguments`]."""
    adapters = _parse_named_paths(args.adapters)
    if args.output_dir is None and not args.search:
        raise ValueError(
            "--output_dir is required to save the merge (or pass --search to only print the weight table)."
        )
    if args.search and args.dev_file is None:
        raise ValueError("--search needs --dev_file (dev task rows, and the pairs unless --pairs_file is given).")
    weights = list(args.weights) if args.weights is not None else None
    if args.output_dir is not None:  # every input, the dev files too, is checked before the (slow) search
        prepare_merge(
            args.base_model_name_or_path,
            adapters,
            weights,
            args.combination,
            args.svd_rank,
            args.output_dir,
            args.overwrite,
            extra_inputs=[("--dev_file", args.dev_file), ("--pairs_file", args.pairs_file)] if args.search else [],
        )
    section = None
    if args.search:
        task_rows = load_rows(args.dev_file, option="--dev_file", row_name="task row")
        pairs = load_rows(args.pairs_file, option="--pairs_file", row_name="pair") if args.pairs_file else task_rows
        best, table = search_merge_weights(
            args.base_model_name_or_path,
            adapters,
            task_rows,
            pairs,
            search_adapter=args.search_adapter,
            grid=args.search_weights,
            weights=weights,
            combination=args.combination,
            svd_rank=args.svd_rank,
            align_layer=args.align_layer,
            max_task_loss_increase=args.max_task_loss_increase,
            batch_size=args.batch_size,
            max_length=args.max_length,
            source_column=args.source_column,
            target_column=args.target_column,
            language_column=args.language_column,
        )
        weights = dict(zip(adapters, weights)) if weights is not None else dict.fromkeys(adapters, 1.0)
        weights[args.search_adapter] = best
        section = (
            f"## Weight search\n\nThe weight of `{args.search_adapter}` was chosen on `{args.dev_file}`: the highest "
            f"retrieval accuracy at layer {table[0]['layer']} among the weights whose dev task loss is at most "
            f"{100 * args.max_task_loss_increase:g}% above weight 0.\n\n"
            + format_search_table(table, args.search_adapter)
        )
        print(
            f"Weight search for {args.search_adapter!r} ({args.combination}); rule: highest retrieval accuracy at "
            f"layer {table[0]['layer']} with task loss at most {100 * args.max_task_loss_increase:g}% above weight 0."
        )
        print(format_search_table(table, args.search_adapter))
        if args.output_dir is None:
            return
    merge_adapters(
        args.base_model_name_or_path,
        adapters,
        weights=weights,
        combination=args.combination,
        svd_rank=args.svd_rank,
        output_dir=args.output_dir,
        merge_into_base=args.merge_into_base,
        overwrite=args.overwrite,
    )
    if section is not None:
        update_card(args.output_dir, "weight search", section)
    print(f"Saved the merged {'model' if args.merge_into_base else 'adapter'} to {args.output_dir}")
