"""The one exception type for user mistakes: the CLI prints its message as one line and exits 2."""


class CurlpruneError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""
