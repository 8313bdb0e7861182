"""The one exception type for bad user input (the CLI prints its message as one line and exits 1), and the one-line
form of any exception's message."""


class UserError(Exception):
    """Bad input (a file, a flag, a config field); str(e) is the whole message shown to the user."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): a cause shown on one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
