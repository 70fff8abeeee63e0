"""The base of every error meant for the user of a command (a wrong path, a malformed file, an invalid
option): :func:`m2clip_fast.cli.run_main` prints these as one line. Any other exception is a bug and keeps
its traceback."""


class UserError(Exception):
    """A problem with what the user gave, explained by the message alone. Subclasses also derive from the
    builtin type library callers expect (ValueError, KeyError, ...)."""


class UsageError(UserError, ValueError):
    """An option, setting or argument value that cannot be used (an unknown name, a value out of range)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named does not exist."""
