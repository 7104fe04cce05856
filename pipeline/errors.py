"""Errors that the command line reports as one line, without a traceback."""


class PipelineError(Exception):
    """A user-facing error: the message names the problem and the fix."""


class CacheFormatError(PipelineError):
    """The directory is not a readable cache of this format (or is corrupt)."""


class CacheWriteError(PipelineError):
    """Writing a cache failed; committed shards are intact."""
