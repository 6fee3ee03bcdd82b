"""The library's own exception types.

Every error a user can cause is one of these, with a message that names the file, field or
value and says what to do. The CLI prints the message alone (no traceback unless --debug).
"""


class DistSaeError(Exception):
    """Base class of errors a user can cause and fix."""


class ConfigError(DistSaeError, ValueError):
    """A configuration value or combination that makes no sense."""


class DataError(DistSaeError):
    """A dataset folder, shard or row that cannot be used as it is."""


class StorageError(DataError):
    """Object storage that cannot be reached, read or written (a URL, the credentials, the endpoint)."""


class ModelError(DistSaeError):
    """A model file that is missing, corrupt, or does not fit the data or config."""


class CheckpointError(DistSaeError):
    """A run directory or checkpoint that cannot be written or resumed."""


class TrainingError(DistSaeError):
    """Training cannot go on (non-finite values, too many failed workers, ...)."""


class Interrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C/SIGINT after checkpointing; the message says where and how to resume.

    A KeyboardInterrupt, so code that stops on Ctrl-C still stops; the CLI exits with 130.
    """


class Terminated(Interrupted):
    """Training stopped on SIGTERM (`ray job stop`, preemption) after checkpointing; the CLI exits with 143."""
