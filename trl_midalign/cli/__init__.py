"""The `trl-midalign` command line: `trl-midalign <command> --help` lists each command's options.

Each command is a module of this package named after it, holding the function that runs it, the name of its arguments
dataclass (which lives in the library: `probing/arguments.py`, `merging/arguments.py`, `demo/arguments.py`) and,
optionally, a `USAGE` line; only the module of the command that runs is imported. Parsing is the library's
[`~trl_midalign.parser.MidAlignParser`], as in the recipes.
"""

import importlib
import sys
from types import ModuleType

from .. import __version__
from ..parser import MidAlignParser


COMMANDS = {  # name: (arguments dataclass, run function) in the module `trl_midalign.cli.<name>`, and the help
    "probe": ("ProbeArguments", "run_probe", "per-layer cross-lingual retrieval accuracy (choose align_layer)"),
    "merge": ("MergeArguments", "run_merge", "combine LoRA adapters (task + alignment) into one, or into the base"),
    "demo": ("DemoArguments", "run_demo", "the method end to end on Gemma 3 270M and real parallel text (CPU)"),
}


def _module(command: str) -> ModuleType:
    return importlib.import_module(f".{command}", __name__)


def make_parser(command: str) -> MidAlignParser:
    """The argument parser of `trl-midalign <command>` (`probe`, `merge` or `demo`); `--config FILE.yaml` works too."""
    module = _module(command)
    arguments_cls, _, help_text = COMMANDS[command]
    return MidAlignParser(
        getattr(module, arguments_cls),
        prog=f"trl-midalign {command}",
        usage=getattr(module, "USAGE", None),
        description=help_text[:1].upper() + help_text[1:],
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `trl-midalign` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--version":
        print(f"trl-midalign {__version__}")
        return
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = "\n".join(f"  {name:<8} {help_text}" for name, (_, _, help_text) in COMMANDS.items())
        usage = (
            "usage: trl-midalign <command> [options]\n       trl-midalign --version\n\n"
            f"commands:\n{names}\n\n`trl-midalign <command> --help` lists the options of a command."
        )
        if argv and argv[0] in ("-h", "--help"):
            print(usage)
            return
        print(usage, file=sys.stderr)
        error = f"unknown command {argv[0]!r}" if argv else "a command is required"
        print(f"trl-midalign: error: {error}", file=sys.stderr)
        raise SystemExit(2)
    parser = make_parser(argv[0])
    (arguments,) = parser.parse_args_and_config(argv[1:])
    missing = arguments.missing_options() if hasattr(arguments, "missing_options") else []
    if missing:
        parser.error("the following arguments are required: " + ", ".join(missing))  # exits with code 2
    getattr(_module(argv[0]), COMMANDS[argv[0]][1])(arguments)
