"""One exception type for every user-facing error.

The CLI catches `ReproError`, prints its message as a single line on stderr and exits
non-zero. Anything else is a bug and keeps its traceback.
"""


class ReproError(Exception):
    """A problem with the user's input, data, checkpoint or environment (not a bug)."""


class ConfigError(ReproError):
    """An invalid or unknown configuration value."""


class DataError(ReproError):
    """A dataset that is missing, truncated or in the wrong format."""


class CheckpointError(ReproError):
    """A checkpoint that is missing, torn, unsafe or from another architecture."""
