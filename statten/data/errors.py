"""The errors every data module raises for a dataset it cannot provide."""

from __future__ import annotations

__all__ = ["CorruptSampleError", "DatasetNotFoundError"]


class DatasetNotFoundError(ValueError):
    """A dataset is unknown, missing on disk or not supported yet; the message says what to do."""


class CorruptSampleError(DatasetNotFoundError):
    """A sample file cannot be read or decoded; the one-line message names the file.

    Raised in a DataLoader worker, it is re-created in the main process from the worker's
    formatted traceback; only that traceback's last line, the original message, is kept, so the
    command line still prints one line.
    """

    def __init__(self, message: str) -> None:
        last_line = message.rstrip().rsplit("\n", 1)[-1]
        super().__init__(last_line.split(f"{type(self).__name__}: ", 1)[-1])
