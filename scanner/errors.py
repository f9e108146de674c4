"""The one exception type for user mistakes: faces turn it into a one-line message."""


class MemscanError(Exception):
    """A problem the user can fix (bad path, bad input, bad setting); never a bug."""


def one_line(text: object) -> str:
    """`text` with every whitespace run (newlines included) made one space: messages are one line."""
    return " ".join(str(text).split())
