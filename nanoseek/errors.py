"""The one exception type for bad user input: the CLI prints its message as one line and exits 1."""


class UserError(Exception):
    """Bad input (a file, a flag, a config field); str(e) is the whole message shown to the user."""
