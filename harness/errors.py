"""The one exception type for mistakes a user can make (bad file, missing data, wrong checkpoint).

The CLI prints it as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class HarnessError(Exception):
    """A user-facing error: its message is the whole story, printed on one line."""
