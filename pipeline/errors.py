"""Errors that the command line reports as one line, without a traceback."""


class PipelineError(Exception):
    """A user-facing error: the message names the problem and the fix."""


class CacheFormatError(PipelineError):
    """The directory is not a readable cache of this format (or is corrupt)."""


class CacheWriteError(PipelineError):
    """Writing a cache failed; committed shards are intact."""


class Stopped(BaseException):
    """SIGTERM outside a training loop's own handling (before it starts, during the export): raised
    where the process is, so cleanup (`finally`, locks) runs and the command line says so in one
    line. A BaseException, as KeyboardInterrupt: `except Exception` must not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signum)


def raise_stopped(signum: int, frame) -> None:
    """A signal handler: stop the command where it is (`Stopped`)."""
    raise Stopped(signum)
