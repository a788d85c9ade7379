"""The `trl-midalign` command line: `trl-midalign <command> --help` lists each command's options.

Each command is a module of this package named after it, holding the command's arguments dataclass, the function that
runs it and, optionally, a `USAGE` line; only the module of the command that runs is imported.
"""

import argparse
import importlib
import sys
from types import ModuleType

from transformers import HfArgumentParser

from .. import __version__


COMMANDS = {  # name: (arguments dataclass, run function) in the module `trl_midalign.cli.<name>`, and the help
    "probe": ("ProbeArguments", "run_probe", "per-layer cross-lingual retrieval accuracy (choose align_layer)"),
    "merge": ("MergeArguments", "run_merge", "combine LoRA adapters (task + alignment) into one, or into the base"),
    "demo": ("DemoArguments", "run_demo", "the method end to end on Gemma 3 270M and real parallel text (CPU)"),
}

# HfArgumentParser adds a `--no_X` flag for every boolean option that defaults to True and gives it the help of `--X`,
# which then reads as the opposite of what the flag does. These say what turning the option off does.
NEGATIVE_FLAG_HELP = {
    "plot": "Do not write the heatmap and curve PNGs (matplotlib is then not needed); probe.json is still written.",
    "alignment": "Train without the alignment loss: the plain SFT baseline (TRL's SFTTrainer), no parallel pairs "
    "used.",
    "check_ranks": "Deprecated, no effect (as --check_ranks): the check that all processes end with identical "
    "weights runs in the test suite.",
    "use_peft": "Train the full model instead of a LoRA adapter; the recipes refuse this unless --eval_only.",
}


def describe_negative_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    r"""
    Gives every `--no_X` flag of a [`~transformers.HfArgumentParser`] (or [`~trl.TrlParser`]) a help text of its own.

    The text comes from `NEGATIVE_FLAG_HELP` for this project's options; any other `--no_X` (TRL's and transformers'
    options) says that it turns `--X` off and quotes the help of `--X`.

    Args:
        parser (`argparse.ArgumentParser`):
            The parser, changed in place.

    Returns:
        `argparse.ArgumentParser`: the same parser.
    """
    for action in parser._actions:
        if not isinstance(action, argparse._StoreFalseAction) or f"--no_{action.dest}" not in action.option_strings:
            continue
        text = NEGATIVE_FLAG_HELP.get(action.dest)
        if text is None:
            positive = (action.help or "").strip()
            text = f"Turn --{action.dest} off" + (f" (--{action.dest}: {positive})" if positive else ".")
        action.help = text
    return parser


def _module(command: str) -> ModuleType:
    return importlib.import_module(f".{command}", __name__)


def make_parser(command: str) -> HfArgumentParser:
    """The argument parser of `trl-midalign <command>` (`probe`, `merge` or `demo`)."""
    module = _module(command)
    arguments_cls, _, help_text = COMMANDS[command]
    parser = HfArgumentParser(
        getattr(module, arguments_cls),
        prog=f"trl-midalign {command}",
        usage=getattr(module, "USAGE", None),
        description=help_text[:1].upper() + help_text[1:],
    )
    return describe_negative_flags(parser)


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
    (arguments,) = parser.parse_args_into_dataclasses(argv[1:])
    missing = arguments.missing_options() if hasattr(arguments, "missing_options") else []
    if missing:
        parser.error("the following arguments are required: " + ", ".join(missing))  # exits with code 2
    getattr(_module(argv[0]), COMMANDS[argv[0]][1])(arguments)
