"""The package's layers, read from the source: the library never imports the command line or the demo (its lab bench),
and the parsers of commands and recipes are one class."""

import ast
import os

from testing_utils import load_script

import trl_midalign
from trl_midalign.cli import COMMANDS, make_parser
from trl_midalign.parser import MidAlignParser


PACKAGE = os.path.dirname(trl_midalign.__file__)


def imported_modules(path: str) -> set[str]:
    """The absolute names of the trl_midalign modules that the file at `path` imports (relative imports resolved)."""
    module = os.path.relpath(path, os.path.dirname(PACKAGE))[: -len(".py")].replace(os.sep, ".")
    package = module.rsplit(".", 1)[0]  # the package a relative import starts from (also for an __init__)
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("trl_midalign")}


def library_files(*excluded: str) -> dict[str, set[str]]:
    files = {}
    for folder, _, names in os.walk(PACKAGE):
        relative = os.path.relpath(folder, PACKAGE)
        if relative.split(os.sep)[0] in excluded:
            continue
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                files[os.path.relpath(path, PACKAGE)] = imported_modules(path)
    return files


def test_no_library_module_imports_the_command_line():
    files = library_files("cli")
    assert len(files) > 20  # the walk saw the package
    offenders = {
        path: sorted(m for m in modules if m.startswith("trl_midalign.cli")) for path, modules in files.items()
    }
    assert {path: found for path, found in offenders.items() if found} == {}


def test_the_library_core_never_imports_the_demo():
    files = library_files("cli", "demo")
    offenders = {
        path: sorted(m for m in modules if m.startswith("trl_midalign.demo")) for path, modules in files.items()
    }
    assert {path: found for path, found in offenders.items() if found} == {}
    # and the check can fail: the demo's own modules do import the library and each other
    assert any(m.startswith("trl_midalign.demo") for m in imported_modules(os.path.join(PACKAGE, "demo", "run.py")))


def test_commands_and_recipes_parse_with_one_parser_class():
    for command in COMMANDS:
        assert type(make_parser(command)) is MidAlignParser, command
    recipes = os.path.join(os.path.dirname(PACKAGE), "recipes")
    names = sorted(name for name in os.listdir(recipes) if name.endswith(".py"))
    assert len(names) >= 3
    for name in names:
        assert type(load_script(os.path.join(recipes, name)).make_parser()) is MidAlignParser, name
