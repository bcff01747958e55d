"""The one exception type for mistakes a user can make (bad file, missing data, wrong checkpoint).

The CLI prints it as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class HarnessError(Exception):
    """A user-facing error: its message is the whole story, printed on one line."""


def field_path(loc) -> str:
    """A pydantic error location as the user wrote it: ``results[2].metrics``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(file)"


def first_problem(exc) -> str:
    """``field: message`` of a pydantic ValidationError's first error (the one-line error's core)."""
    e = exc.errors()[0]
    return f"{field_path(e['loc'])}: {e['msg']}"
