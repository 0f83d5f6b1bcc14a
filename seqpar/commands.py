"""How a module adds its `seqpar` subcommands, the one way they are registered.

Each command module has `add_parser(subparsers)`: it adds its parser and sets
`func(args) -> int` (the exit status). `seqpar/cli.py` lists those functions. A command
that has subcommands of its own (`bench`, `eval`, `study`, `ckpt`) is made with
`add_group`, which prints the group's help when no subcommand is given.
"""

from __future__ import annotations

import argparse
import sys


def add_group(subparsers, name: str, *, help: str, metavar: str, description: str | None = None):
    """Add the command `name` with subcommands; returns the subparsers to add them to."""
    group = subparsers.add_parser(name, help=help, description=description)
    group.set_defaults(func=lambda args: _print_help(group))
    return group.add_subparsers(dest=name, metavar=metavar)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def about(module_doc: str) -> str:
    """The first paragraph of a command module's docstring, on one line: the command's
    description in `--help`, written once where a reader of the code sees it too."""
    return " ".join(module_doc.split("\n\n")[0].split())
