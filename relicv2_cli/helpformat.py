"""`--help` rendering: upper-case argument names without braces, no type beside flags, and commands
listed without importing them.

Typer 0.29 writes required arguments as `{spec}` in the usage line and shows `<bool>` beside every
flag, `--help` included, although flags take no value. `plain_help(app)` switches every command and
group of an app to the classes below before the app runs.

The stage modules import torch (seconds). `lazy_group(table)` makes a group whose commands are
imported only when one of them runs (or shows its own --help); the group's --help lists them from
the table's one-line helps, so `relicv2 --help` starts without torch.
"""

from __future__ import annotations

import importlib

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


class LazyGroup(PlainHelpGroup):
    """A group with commands imported on first use; `lazy`: name -> (module, attribute, one-line help)."""

    lazy: dict[str, tuple[str, str, str]] = {}
    _listing = False  # True while this group's --help is drawn: table entries, no imports

    def list_commands(self, ctx) -> list[str]:
        return [*super().list_commands(ctx), *(name for name in self.lazy if name not in self.commands)]

    def get_command(self, ctx, name: str):
        if name in self.commands or name not in self.lazy:
            return super().get_command(ctx, name)
        module, attribute, help = self.lazy[name]
        if self._listing:
            return PlainHelpCommand(name, help=help)
        single = typer.Typer()
        single.command(name, cls=PlainHelpCommand)(getattr(importlib.import_module(module), attribute))
        self.commands[name] = typer.main.get_command(single)
        return self.commands[name]

    def format_help(self, ctx, formatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


def lazy_group(table: dict[str, tuple[str, str, str]]) -> type[LazyGroup]:
    """A LazyGroup class for one group's table (Typer instantiates the class itself)."""
    return type("LazyGroup", (LazyGroup,), {"lazy": table})


def plain_help(app: typer.Typer) -> None:
    """Use the plain help classes for `app`, its commands and its sub-apps (recursively)."""
    if not (isinstance(app.info.cls, type) and issubclass(app.info.cls, PlainHelpGroup)):
        app.info.cls = PlainHelpGroup
    for command in app.registered_commands:
        command.cls = PlainHelpCommand
    for group in app.registered_groups:
        plain_help(group.typer_instance)
