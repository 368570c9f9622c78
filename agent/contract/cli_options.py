"""Global options on both command lines (`agent`, `fleet`): accepted before and after the
subcommand, as git and kubectl users expect (`agent run --config X` and `agent --config X run`)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import NoReturn

from agent.contract.protocol import name_problem


class Parser(argparse.ArgumentParser):
    """An argument mistake is one line, like every other error (agent.contract.cli_errors): what is
    wrong and where to look, exit 2. argparse would print the usage block first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


AddOptions = Callable[[argparse.ArgumentParser, object], None]  # (parser, default) -> None


def global_options(config_help: str) -> AddOptions:
    """--config and --debug (a traceback instead of one line; agent.contract.cli_errors)."""

    def add(p: argparse.ArgumentParser, default: object) -> None:
        p.add_argument("--config", default=default, help=config_help)
        debug_default = False if default is None else default
        p.add_argument("--debug", action="store_true", default=debug_default, help="show an error's traceback")

    return add


def accept_everywhere(parser: argparse.ArgumentParser, add: AddOptions) -> None:
    """`add` puts the global options on `parser` and on every subcommand below it. Below the top
    their default is SUPPRESS, so a subcommand that was not given one keeps the value given
    before it."""
    add(parser, None)
    _below(parser, add)


def _below(parser: argparse.ArgumentParser, add: AddOptions) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                add(sub, argparse.SUPPRESS)
                _below(sub, add)


def name_arg(what: str) -> Callable[[str], str]:
    """An argparse `type` for a name (agent.contract.protocol.NAME_RULE): a bad one is refused
    with the rule, before anything is sent, uploaded or written."""

    def check(value: str) -> str:
        problem = name_problem(what, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return check


def positive_int(value: str) -> int:
    """An argparse `type`: a whole number above 0."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be above 0")
    return number


def tolerance(value: str) -> float:
    """An argparse `type`: a finite number >= 0."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"{value} must be a finite number >= 0")
    return number
