"""User-facing errors: the CLI prints their message, never a traceback."""


class TorqError(Exception):
    """A problem with the user's input or environment, with a message that names it."""
