"""Global options on both command lines (`agent`, `fleet`): accepted before and after the
subcommand, as git and kubectl users expect (`agent run --config X` and `agent --config X run`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

AddOptions = Callable[[argparse.ArgumentParser, object], None]  # (parser, default) -> None


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
