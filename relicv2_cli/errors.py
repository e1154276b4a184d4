"""The one exception type that the CLI turns into a one-line error and a non-zero exit."""


class RelicError(Exception):
    """Bad input or a refused operation. The message is shown to the user as one line."""


class BadImage(RelicError):
    """An image file that does not decode (truncated, unreadable): a streamed read adds what to do
    about it (data.streamed_error)."""
