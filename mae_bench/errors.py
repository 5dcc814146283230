"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class MaeBenchError(ValueError):
    """Bad input from the user (a name, a path, a value). The message names the bad value and
    the fix; the CLI shows it without a traceback."""


class DataError(MaeBenchError):
    """A data set is missing, empty, malformed or has too many unreadable images."""


class ConfigError(MaeBenchError):
    """A configuration value or file is invalid."""


class CheckpointError(MaeBenchError):
    """A checkpoint is missing, unreadable, or does not match what was asked."""


class TrainingError(RuntimeError):
    """A run stopped for a reason found while training (e.g. a non-finite loss). The message names
    the step; the last good checkpoint is kept. The CLI shows it without a traceback (exit 1)."""
