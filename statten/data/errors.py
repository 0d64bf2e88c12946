"""The error every data module raises for a dataset it cannot provide."""

from __future__ import annotations

__all__ = ["DatasetNotFoundError"]


class DatasetNotFoundError(ValueError):
    """A dataset is unknown, missing on disk or not supported yet; the message says what to do."""
