from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2, nothing written."""


class TrainingError(Exception):
    """A run that cannot go on (non-finite loss, unreadable checkpoint): one line, exit code 1."""
