"""The one exception type that the CLI turns into a one-line error and a non-zero exit."""


class RelicError(Exception):
    """Bad input or a refused operation. The message is shown to the user as one line."""
