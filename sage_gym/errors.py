"""Errors that users see: each says what was wrong and what is accepted."""


def install_hint(extra: str) -> str:
    """The command that installs an optional extra, as the package is installed: from its source folder."""
    return f"pip install -e '.[{extra}]' (in the SAGE source folder)"


class SageError(Exception):
    """Base class of the project's user-facing errors (the CLI prints them without a traceback)."""


class UnknownEnvError(SageError, KeyError):
    """An env id that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataNotFoundError(SageError, FileNotFoundError):
    """A data folder that is missing or incomplete."""


class EnvCrashedError(SageError, RuntimeError):
    """The process behind an environment (a game engine, a JVM) died."""
