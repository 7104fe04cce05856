"""Ctrl-C and SIGTERM during training: finish the step, checkpoint, say how to resume.

A loop iterates its batches through `StopOnSignal.until(batches)`: while it does, the first SIGINT
or SIGTERM only ends the iteration after the current step, so the loop's own code after it writes
the final checkpoint as usual; `end(step, checkpoint)` then raises `Interrupted`, which the command
line prints as one line and turns into exit status 128 + the signal (130 for Ctrl-C, 143 for
SIGTERM). A second signal exits at once; the last checkpoint written stays whole (they are written
atomically). Outside `until` and after `end`, the handlers the process had are back.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Training stopped on a signal after a whole step, with its checkpoint written."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, total_steps: int | None = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        of = f" of {total_steps}" if total_steps else ""
        where = f"checkpoint in {checkpoint}" if checkpoint else "no checkpoint kept (no run folder)"
        super().__init__(f"interrupted ({signal.Signals(signum).name}) after step {step}{of}: {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _abort(signum: int) -> None:
    """The second signal: leave now (no cleanup may block it)."""
    os.write(2, b"aborted: the last checkpoint written is kept\n")
    os._exit(128 + signum)


class StopOnSignal:
    """Turns SIGINT/SIGTERM into a stop after the current step while a loop iterates `until(...)`.
    `enabled=False` (data-parallel ranks, which must stop at the same step) leaves signals alone."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            _abort(signum)
        self.signum = signum
        lead = "\n" if os.isatty(2) else ""  # off a progress bar's line
        os.write(2, f"{lead}{signal.Signals(signum).name}: stopping after this step to write a checkpoint "
                    "(again to abort at once)\n".encode())

    def until(self, batches: Iterable[T]) -> Iterator[T]:
        """`batches`, ending early after the item during which a signal came."""
        if self.enabled:
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        for item in batches:
            yield item
            if self.signum is not None:
                return

    def restore(self) -> None:
        """The process's own handlers back (idempotent)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)  # None: not set from Python
        self._previous = {}

    def end(self, step: int, checkpoint: Path | None, total_steps: int | None = None) -> None:
        """After the loop and its final checkpoint: restore the handlers; raise `Interrupted` if a
        signal stopped the loop."""
        self.restore()
        if self.signum is not None:
            raise Interrupted(self.signum, step, checkpoint, total_steps)
