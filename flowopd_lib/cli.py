"""What every command line of the project shares: its inputs are checked before any compute, and a
user's mistake is one line naming the value and the fix, exit status 2, without a traceback.

    parser = cli.parser(__doc__)
    parser.add_argument("--every", type=cli.count)           # 1 or more, else a one-line error
    parser.add_argument("--out", type=cli.new_file)          # its folder must exist

    @cli.entry
    def main(argv=None): ...                                 # raise cli.UserError("...") for a mistake

A mistake is a UserError (a ValueError): ConfigError, safe_files.FileError, checkpoint.CheckpointError,
data.TestSetTooSmall and the runner's UsageError derive from it, so library code raises them and
every command reports them alike. `--debug` anywhere on the command line, or FLOWOPD_DEBUG=1, shows
the traceback instead. Anything else (a bug, a failing notebook) keeps its traceback. This module
imports nothing of the package, so every module may derive its errors from it.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

DEBUG_FLAG = "--debug"
DEBUG_ENV = "FLOWOPD_DEBUG"


class UserError(ValueError):
    """A command's input is wrong (a value, a file, a folder): the message names it and the fix."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors (a missing argument, a bad value) are one line, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (--help lists the arguments)\n")


def parser(description: str | None = None, **kwargs) -> Parser:
    """The command's parser: its docstring as help, and `--debug` listed (`entry` acts on it)."""
    made = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    made.add_argument(DEBUG_FLAG, action="store_true",
                      help=f"on an error, show the traceback (also: {DEBUG_ENV}=1)")
    return made


def entry(main):
    """Wrap a command's `main(argv)`: UserError -> `error: <message>` on stderr, exit status 2,
    unless `--debug` (taken out of argv, wherever it stands) or FLOWOPD_DEBUG=1 asks for the traceback."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None):
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        try:
            return main([a for a in argv if a != DEBUG_FLAG])
        except UserError as error:
            if debug:
                raise
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
    return run


def key_value(item: str, flag: str) -> tuple[str, object]:
    """`key=value` -> (key, value read as YAML): every command's overrides. Anything else (`lr`
    alone would read as lr=None), or a value that is not YAML, is a UserError naming `flag` and it."""
    import yaml

    key, equals, value = item.partition("=")
    if not equals or not key.strip():
        raise UserError(f"{flag} {item!r} is not key=value: write e.g. {key.strip() or 'lr'}=VALUE (the value is "
                        "read as YAML, e.g. lr=3e-4 or rewards={geneval: 1.0})")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{flag} {item!r}: the value is not YAML ({problem}); e.g. rewards={{geneval: 1.0}}, "
                        f"or quote a string: {key.strip()}='...'") from None


def count(text: str) -> int:
    """argparse type: an int of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: give a whole number, 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give 1 or more")
    return value


def new_file(text: str) -> Path:
    """argparse type: a file to write, in a folder that exists (nothing is created for a typo)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: name the file to write in it")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no folder {path.parent}; create it or write elsewhere")
    return path
