"""[`MidAlignParser`]: the one argument parser of trl-midalign, for the `trl-midalign` commands and the recipes alike.

It is TRL's [`~trl.TrlParser`] (dataclasses, `--config` YAML files, `env` in the YAML) with two additions: a YAML key
that no dataclass knows is refused naming the closest known keys, and every `--no_X` flag gets a help text that says
what turning the option off does (argparse gives it the help of `--X`, which reads as the opposite).
"""

import argparse
import difflib
import os
import sys
from collections.abc import Iterable, Sequence

from trl import TrlParser


# What turning off each boolean option of this project that defaults to True does (`--no_X`)
NEGATIVE_FLAG_HELP = {
    "plot": "Do not write the heatmap and curve PNGs (matplotlib is then not needed); probe.json is still written.",
    "alignment": "Train without the alignment loss: the plain SFT baseline (TRL's SFTTrainer), no parallel pairs "
    "used.",
    "use_peft": "Train the full model instead of a LoRA adapter; the recipes refuse this unless --eval_only.",
}


def describe_negative_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    r"""
    Gives every `--no_X` flag of a parser built from dataclasses a help text of its own.

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


class MidAlignParser(TrlParser):
    """
    [`~trl.TrlParser`] for trl-midalign's commands and recipes: dataclass arguments, `--config` YAML files (command-line
    flags override the file), `--no_X` flags that say what they do, and unknown YAML keys refused with a suggestion.

    Args:
        dataclass_types (`type` or `Iterable[type]`):
            The argument dataclasses, as for [`~trl.TrlParser`].
        **kwargs:
            Passed on to [`~trl.TrlParser`] (`prog`, `usage`, `description`, ...).

    Example:

    ```python
    >>> from trl import ModelConfig
    >>> from trl_midalign import AlignmentConfig
    >>> from trl_midalign.parser import MidAlignParser

    >>> parser = MidAlignParser((AlignmentConfig, ModelConfig))
    >>> training_args, model_args = parser.parse_args_and_config(["--output_dir", "out", "--align_layer", "12"])
    ```
    """

    def __init__(self, dataclass_types: type | Iterable[type], **kwargs):
        super().__init__(dataclass_types, **kwargs)
        describe_negative_flags(self)

    def parse_args_and_config(self, args: Sequence[str] | None = None, **kwargs) -> tuple:
        """As [`~trl.TrlParser.parse_args_and_config`], refusing a `--config` path that is not a file first."""
        argv = list(sys.argv[1:] if args is None else args)
        self._config_path = None
        if "--config" in argv:
            index = argv.index("--config")
            self._config_path = argv[index + 1] if index + 1 < len(argv) else None
            if self._config_path is None or not os.path.isfile(self._config_path):
                raise FileNotFoundError(f"--config {self._config_path}: no such file; give the path of a YAML file.")
        return super().parse_args_and_config(argv, **kwargs)

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        """Take the YAML file's values as defaults, refusing keys that are no argument (naming the closest ones)."""
        known = {action.dest for action in self._actions}
        unknown = [key for key in kwargs if key not in known]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=2)
                hints.append(f"{key!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
            names = " or ".join(cls.__name__ for cls in self.dataclass_types)
            raise ValueError(
                f"{getattr(self, '_config_path', None) or '--config'}: unknown key(s) {', '.join(hints)}. Every key "
                f"must be an argument of {names}; fix the spelling or remove it."
            )
        return super().set_defaults_with_config(**kwargs)
