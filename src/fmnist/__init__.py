"""fmnist: a reproducible Fashion-MNIST training pipeline."""

__version__ = "0.2.0"  # the one version: pyproject.toml reads it (setuptools dynamic version)


class FmnistError(Exception):
    """An error the user can fix; its message says what is wrong and how. The CLI
    prints it without a traceback."""

    exit_code = 1


class ConfigError(FmnistError, ValueError):
    """A params value is wrong. The message names the key and what is allowed."""

    exit_code = 2
