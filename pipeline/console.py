"""The rich console every command prints its tables and lines to, and the lines that say how a long
command goes (`Heartbeat`).

On a terminal, rich lays text out for its width. Off one (a log file, a pipe) rich assumes 80
columns and would cut tables and wrap lines; there, the console never cuts or wraps, so a log
reads as the terminal did.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from rich.console import Console


def log_console() -> Console:
    """A rich console for stdout; off a terminal, one that never cuts or wraps."""
    out = Console()
    return out if out.is_terminal else Console(width=100_000, soft_wrap=True)


def duration(seconds: float) -> str:
    """0:42, 12:03, 1:02:03."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Heartbeat:
    """A line at once and then every `every` seconds while a long command works, printed from a
    background thread so that a slow step cannot hold it back: `line()` says how far the command is
    (None: nothing to say). `beat()` says another line was just printed (a metric line): the next
    comes `every` seconds after it."""

    def __init__(self, line: Callable[[], str | None], every: float = 10.0, console: Console | None = None):
        self.line, self.every = line, every
        self.console = console or log_console()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    def say(self) -> None:
        text = self.line()
        if text:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        self.beat()

    def __enter__(self) -> "Heartbeat":
        self.say()
        self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.every)):
            if time.monotonic() - self._last >= self.every:
                self.say()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()


class Status:
    """What a long command is doing, for a `Heartbeat`: the text last `set`, with the time since the start."""

    def __init__(self, text: str):
        self.text, self.start = text, time.monotonic()

    def set(self, text: str) -> None:
        self.text = text

    def line(self) -> str:
        return f"{self.text} ({duration(time.monotonic() - self.start)} in)"
