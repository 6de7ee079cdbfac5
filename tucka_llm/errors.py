"""The one base class of every error a user can cause and fix (bad flag, bad data, a directory in use, ...).

Each raises with a message that says what was wrong and how to fix it; every command catches ``TuckaError`` alone
and prints ``error: <message>`` (``tucka_llm.cli``). Anything else is a bug and keeps its traceback.
"""


class TuckaError(ValueError):
    """A user-facing error: its message names what was wrong (file and line, or the flag) and what to do."""

    exit_status = 1  # the command's exit status when this error ends it
