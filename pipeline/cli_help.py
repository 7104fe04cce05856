"""`--help` of the command line: each option's real default, flags shown as flags, texts shown as
written, laid out so that the help texts get the width.

Part of the face (pipeline/cli.py): it reads a stage's config dataclass from its source to show its
defaults. A command's help is drawn here (rich: a usage line, its docstring, an Arguments and an
Options panel) rather than by typer: typer's table gives each of an option's four name columns
(long, short, negative long, negative short) and its type their widest entry, ~50 of 110 columns,
so every help text wrapped after 3-5 words. Here an option's names share one column, a flag's
negative form on its own line below it (`--keep-special-tokens` under `--exclude-special-tokens`),
and the help text takes the rest.
"""

from __future__ import annotations

import inspect
import os

from typer.core import TyperCommand, TyperGroup

from pipeline.cli_options import config_defaults, module_constant

# Most options default to None so that a --config file's values stand unless a flag is given; their
# real defaults are the fields of the stage's config dataclass, which `--help` imports to show them.
CONFIGS = {"cache": ("cache_writer.run", "CacheConfig"), "train": ("trainer.run", "TrainConfig"),
           "sweep": ("trainer.run", "TrainConfig"), "eval": ("analysis.evaluate_ce", "EvalConfig"),
           "report": ("analysis.report", "ReportConfig")}
FIELD_OF = {"hook": "hooks"}  # `pipeline cache --hook` fills CacheConfig.hooks
# Defaults a command sets over its dataclass's: (module, constant) holding them, read from the source.
NAMES_WIDTH = 26
"""A flag and its negative share a line up to this many characters (the longest single name in use)."""
OVERRIDES = {"sweep": ("trainer.sweep", "SWEEP_DEFAULTS")}


def command_defaults(command: str | None) -> dict:
    """Field name -> default of the config dataclass behind `command` (empty for the others), read
    from its source (pipeline.cli_options): `--help` imports no stage."""
    defaults = config_defaults(*CONFIGS[command]) if command in CONFIGS else {}
    return defaults | (module_constant(*OVERRIDES[command]) if command in OVERRIDES else {})


def metavar(param) -> str:
    """How a value is shown in usage, help and errors: an argument as its name in capitals (SAE,
    PATH, REPO_ID), an option's value as TEXT, INT or FLOAT (TEXT... where it repeats), a flag as
    nothing."""
    if param.param_type_name == "argument":
        return param.metavar or param.name.upper()
    if getattr(param, "is_flag", False):
        return ""
    # typer >= 0.2x keeps the annotation; older typer (and click) a click ParamType.
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    name = getattr(annotation, "__name__", None) or getattr(getattr(param, "type", None), "name", "")
    value = {"int": "INT", "integer": "INT", "float": "FLOAT"}.get(str(name).lower(), "TEXT")
    return value + ("..." if getattr(param, "multiple", False) else "")


def _default_text(param) -> str | None:
    """`[default: ...]`'s value: a flag pair shows the name in force (no-resume), a lone flag and a
    None default show nothing."""
    default = param.default
    if param.required or default is None or default in ((), []) or param.show_default is False:
        return None
    if getattr(param, "is_flag", False):
        if not param.secondary_opts:
            return None
        return (param.opts if default else param.secondary_opts)[0].lstrip("-")
    if isinstance(default, (list, tuple)):
        return ", ".join(str(v) for v in default)
    return str(default)


def _help_text(param):
    from rich.text import Text

    text = Text(param.help or "")
    extras = [f"default: {d}" for d in [_default_text(param)] if d is not None]
    extras += ["required"] if param.required else []
    if extras:
        text.append(("  " if param.help else "") + f"[{'; '.join(extras)}]", style="dim")
    return text


def _panel(title: str, rows: list[tuple[str, str, object]], width: int):
    from rich import box
    from rich.panel import Panel
    from rich.table import Table

    names = max((len(line) for name, _, _ in rows for line in name.splitlines()), default=0)
    values = max((len(v) for _, v, _ in rows), default=0)
    table = Table(show_header=False, box=None, padding=(0, 1), pad_edge=False, expand=True)
    table.add_column(style="bold cyan", no_wrap=True, width=names)
    table.add_column(style="bold yellow", no_wrap=True, width=values)
    table.add_column(ratio=1)  # the help texts: every column the names and values leave
    for row in rows:
        table.add_row(*row)
    return Panel(table, title=title, title_align="left", border_style="dim", box=box.ROUNDED, width=width)


def render_help(command, ctx) -> None:
    """A command's `--help`, printed (see the module docstring)."""
    from rich.console import Console
    from rich.padding import Padding
    from rich.text import Text

    width = os.environ.get("TERMINAL_WIDTH")  # typer's override of the terminal's width; else COLUMNS or 80
    console = Console(width=int(width) if width and width.isdigit() else None, highlight=False)
    params = [p for p in command.get_params(ctx) if not getattr(p, "hidden", False)]
    args = [p for p in params if p.param_type_name == "argument"]
    opts = [p for p in params if p.param_type_name == "option"]
    usage = [ctx.command_path, "[OPTIONS]"] + [metavar(a) if a.required else f"[{metavar(a)}]" for a in args]
    console.print(Text(" Usage: ", style="yellow").append(" ".join(usage), style="bold"))
    console.print()
    for paragraph in inspect.cleandoc(command.help or "").split("\n\n"):
        console.print(Padding(Text(" ".join(paragraph.split())), (0, 1, 1, 1), expand=False))
    if args:
        console.print(_panel("Arguments", [(metavar(a), "", _help_text(a)) for a in args], console.width))
    rows = []
    for p in opts:
        names = ", ".join(sorted(p.opts, key=lambda o: not o.startswith("--")))  # --out, -o
        negative = ", ".join(p.secondary_opts)
        if negative:  # --resume/--no-resume; a longer pair on two lines
            names += f"/{negative}" if len(names) + 1 + len(negative) <= NAMES_WIDTH else f"\n{negative}"
        rows.append((names, metavar(p), _help_text(p)))
    console.print(_panel("Options", rows, console.width))


class ShownHelp:
    """`--help` that shows each option's effective default, shows flags as flags (no `<bool>`
    value), and prints help texts literally (`[base]` is not rich markup)."""

    _in_help = False

    def format_help(self, ctx, formatter) -> None:
        self._in_help = True
        try:
            if isinstance(self, TyperGroup):  # the command list: typer's panel, docstrings as plain text
                from rich.markup import escape

                text, self.help = self.help, escape(self.help or "")
                try:
                    super().format_help(ctx, formatter)
                finally:
                    self.help = text
            else:
                render_help(self, ctx)
        finally:
            self._in_help = False

    def get_params(self, ctx) -> list:
        params = super().get_params(ctx)
        for p in params:  # usage and errors name an argument as help does: `Missing argument 'SAE'`
            if p.param_type_name == "argument" and p.metavar is None:
                p.metavar = p.name.upper()
        if not self._in_help:
            return params
        import copy

        defaults = command_defaults(self.name)
        shown = []
        for p in params:
            p = copy.copy(p)  # the help's copy: parsing keeps the real parameter
            if getattr(p, "is_flag", False):  # typer's group panel would show `<bool>`
                p.metavar = ""
            default = defaults.get(FIELD_OF.get(p.name, p.name))
            if p.default is None and default not in (None, [], {}):
                p.default, p.show_default = default, True
            shown.append(p)
        return shown


class HelpCommand(ShownHelp, TyperCommand):
    """A command with ShownHelp."""


class HelpGroup(ShownHelp, TyperGroup):
    """The command group with ShownHelp."""
