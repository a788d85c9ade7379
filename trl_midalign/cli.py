"""The `trl-midalign` command line: `trl-midalign <command> --help` lists each command's options."""

import sys

from transformers import HfArgumentParser


def _commands() -> dict:
    # Imported here, not at module level, so that importing trl_midalign.cli is cheap.
    # Each entry: (arguments dataclass, run function, help).
    commands = {}
    from .probing import ProbeArguments, run_probe

    commands["probe"] = (ProbeArguments, run_probe, "per-layer cross-lingual retrieval accuracy (choose align_layer)")
    from .merging import MergeArguments, run_merge

    commands["merge"] = (
        MergeArguments,
        run_merge,
        "combine LoRA adapters (task + alignment) into one, or into the base",
    )
    from .demo import DemoArguments, run_demo

    commands["demo"] = (DemoArguments, run_demo, "the method end to end on Gemma 3 270M and real parallel text (CPU)")
    return commands


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `trl-midalign` console script."""
    argv = sys.argv[1:] if argv is None else argv
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        names = "\n".join(f"  {name:<8} {help_text}" for name, (_, _, help_text) in commands.items())
        print(f"usage: trl-midalign <command> [options]\n\ncommands:\n{names}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            raise SystemExit(2)
        return
    arguments_cls, run, _ = commands[argv[0]]
    parser = HfArgumentParser(arguments_cls, prog=f"trl-midalign {argv[0]}")
    (arguments,) = parser.parse_args_into_dataclasses(argv[1:])
    run(arguments)


if __name__ == "__main__":
    main()
