"""The project's exceptions, in one place so every package can raise them without importing upwards."""


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and its source."""


class JobError(RuntimeError):
    """A failure with a clear cause and remedy: reported as one `error: ...` line (no traceback), exit 1."""


class Preempted(JobError):
    """Training stopped on SIGTERM after saving a checkpoint: reported as one `preempted: ...` line, exit 143."""
