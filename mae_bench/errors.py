"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class MaeBenchError(ValueError):
    """Bad input from the user (a name, a path, a value). The message names the bad value and
    the fix; the CLI shows it without a traceback."""


class DataError(MaeBenchError):
    """A data set is missing, empty, malformed or has too many unreadable images."""


class ConfigError(MaeBenchError):
    """A configuration value or file is invalid."""


class StoreWriteError(ConfigError):
    """The results store could not be written once the work was done (a full disk, a store
    removed meanwhile); the append wrote nothing. A sweep stops on it instead of recording the
    point as failed: the point is fine, the store is not."""

    def __init__(self, store: object, reason: object, consequence: str):
        super().__init__(f"--results-dir {store}: the rows could not be written ({reason}); "
                         f"{consequence}")
        self.store, self.reason = store, reason


class CheckpointError(MaeBenchError):
    """A checkpoint is missing, unreadable, or does not match what was asked."""


class TrainingError(RuntimeError):
    """A run stopped for a reason found while training (e.g. a non-finite loss). The message names
    the step (also in ``step`` when known); the last good checkpoint is kept. The CLI shows it
    without a traceback (exit 1)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class RunInterrupted(BaseException):
    """SIGTERM or SIGINT reached a training run: it saved a checkpoint at the step boundary and
    stopped. A BaseException, like KeyboardInterrupt, so that no ``except Exception`` (a sweep
    recording a failed point) swallows it; the CLI exits with 128 + the signal number."""

    def __init__(self, signum: int, step: int, run_dir: str):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        import signal

        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}: checkpoint saved in {run_dir}; "
                         f"resume with: mae-bench pretrain --resume {run_dir}")
