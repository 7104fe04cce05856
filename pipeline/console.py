"""The rich console every command prints its tables and lines to.

On a terminal, rich lays text out for its width. Off one (a log file, a pipe) rich assumes 80
columns and would cut tables and wrap lines; there, the console never cuts or wraps, so a log
reads as the terminal did.
"""

from __future__ import annotations

from rich.console import Console


def log_console() -> Console:
    """A rich console for stdout; off a terminal, one that never cuts or wraps."""
    out = Console()
    return out if out.is_terminal else Console(width=100_000, soft_wrap=True)
