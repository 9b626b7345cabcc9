"""Errors a user can fix; the CLI prints them on one line and exits with code 2."""


class UsageError(Exception):
    """Bad input: an unknown name, a malformed value, a missing file."""


class DataNotFoundError(UsageError):
    """A data file is missing: the message says which, where we looked and how to get it."""
