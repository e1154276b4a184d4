"""`--help` rendering: upper-case argument names without braces, and no type beside flags.

Typer 0.29 writes required arguments as `{spec}` in the usage line and shows `<bool>` beside every
flag, `--help` included, although flags take no value. `plain_help(app)` switches every command and
group of an app to the classes below before the app runs.
"""

from __future__ import annotations

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption


class _PlainHelp:
    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if isinstance(param, TyperArgument) and param.metavar is None:
                # `spec` -> SPEC in the usage line and the arguments table (and in error messages)
                param.metavar = param.name.upper() + ("..." if param.nargs != 1 else "")
            if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
                param.metavar = ""  # the type column shows the metavar, and a flag takes no value
        return params

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                pieces.append(param.metavar if param.required else f"[{param.metavar}]")
        if isinstance(self, TyperGroup):
            pieces.append(self.subcommand_metavar)
        return pieces


class PlainHelpCommand(_PlainHelp, TyperCommand):
    pass


class PlainHelpGroup(_PlainHelp, TyperGroup):
    pass


def plain_help(app: typer.Typer) -> None:
    """Use the plain help classes for `app`, its commands and its sub-apps (recursively)."""
    app.info.cls = PlainHelpGroup
    for command in app.registered_commands:
        command.cls = PlainHelpCommand
    for group in app.registered_groups:
        plain_help(group.typer_instance)
