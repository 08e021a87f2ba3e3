"""The one exception type for user mistakes: the CLI prints its message as one line and exits 2."""


class CurlpruneError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""


def exception_summary(exc: BaseException, limit: int = 120) -> str:
    """``"Type: first line of its text"`` (at most ``limit`` characters of text), for any exception,
    also one whose text is empty or only whitespace (then just its type name)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__
