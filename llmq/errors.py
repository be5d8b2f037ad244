"""The one exception type that means "the user asked for something impossible".

The CLI prints these as a single line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class LlmqError(Exception):
    """A user-facing error: bad path, bad option, unsupported model or data."""
