"""Errors that the same inputs would raise again: bad data, bad config, a model that cannot be used.

Prefect's retry rule (tasks/caching.py) retries every other failure and never these, so a typo in a
config fails once, with its message, instead of three times after the retry delays.
"""


class PermanentError(Exception):
    """A failure that a retry cannot fix; the message names the file, row or config key and what to do."""


class MissingInputError(PermanentError, FileNotFoundError):
    """A file or folder that a stage reads does not exist."""


class InternalError(PermanentError, RuntimeError):
    """A broken invariant of this project's own code: a bug to report (with the run record), not something
    the user's data, config or a retry can fix."""


class DiskFullError(PermanentError, OSError):
    """An output did not fit on its disk. Not retried at once (a disk does not empty itself in seconds);
    after space is freed, a rerun or a Retry continues: finished stages and sealed checkpoints are kept."""
