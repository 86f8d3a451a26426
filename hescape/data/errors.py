"""The one error type of the data layer."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message names the file, the row/column and the fix.

    Subclasses ``ValueError`` so the ``hescape`` CLI prints it without a stack trace.
    """
