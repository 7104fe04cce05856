"""`--help` of the command line: each option's real default, flags shown as flags, texts shown as written.

Part of the face (pipeline/cli.py): it reads a stage's config dataclass from its source to show its
defaults.
"""

from __future__ import annotations

from typer.core import TyperCommand, TyperGroup

from pipeline.cli_options import config_defaults

# Most options default to None so that a --config file's values stand unless a flag is given; their
# real defaults are the fields of the stage's config dataclass, which `--help` imports to show them.
CONFIGS = {"cache": ("cache_writer.run", "CacheConfig"), "train": ("trainer.run", "TrainConfig"),
           "sweep": ("trainer.run", "TrainConfig"), "eval": ("analysis.evaluate_ce", "EvalConfig"),
           "report": ("analysis.report", "ReportConfig")}
FIELD_OF = {"hook": "hooks"}  # `pipeline cache --hook` fills CacheConfig.hooks


def command_defaults(command: str | None) -> dict:
    """Field name -> default of the config dataclass behind `command` (empty for the others), read
    from its source (pipeline.cli_options): `--help` imports no stage."""
    return config_defaults(*CONFIGS[command]) if command in CONFIGS else {}


class ShownHelp:
    """`--help` that shows each option's effective default, shows flags as flags (no `<bool>`
    value), and prints help texts literally (`[base]` is not rich markup)."""

    _in_help = False

    def format_help(self, ctx, formatter) -> None:
        from rich.markup import escape

        text, self.help, self._in_help = self.help, escape(self.help or ""), True
        try:
            super().format_help(ctx, formatter)
        finally:
            self.help, self._in_help = text, False

    def get_params(self, ctx) -> list:
        params = super().get_params(ctx)
        if not self._in_help:
            return params
        import copy

        from rich.markup import escape  # help texts are plain text: `[base]` is not a markup tag

        defaults = command_defaults(self.name)
        shown = []
        for p in params:
            p = copy.copy(p)  # the help's copy: parsing keeps the real parameter
            if getattr(p, "help", None):
                p.help = escape(p.help)
            if getattr(p, "is_flag", False):
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
