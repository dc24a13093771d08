"""Errors that the CLI prints as one clear line (no traceback)."""


class UserError(Exception):
    """Caused by the user's input or configuration: a bad path, value, file or checkpoint."""
