"""The one exception type for mistakes a user can make (bad file, missing data, wrong checkpoint).

The CLI prints it as a single line and exits non-zero; anything else is a bug and keeps its traceback.
Warnings meant for the user are HarnessWarnings; the CLI prints every warning as one line too.
"""

import contextlib
import sys
import warnings
from pathlib import Path


def one_line(text: object) -> str:
    """``text`` on one line: every run of whitespace, newlines included, as one space."""
    return " ".join(str(text).split())


def user_message(exc: BaseException) -> str:
    """The one line a user sees for ``exc``. An error raised in a DataLoader worker reaches the
    training process as torch's "Caught HarnessError in DataLoader worker process 0. Original
    Traceback ..." text: its own message is the last line, after the exception's name."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        name, sep, message = last.partition(": ")
        text = message if sep and name.rsplit(".", 1)[-1] == type(exc).__name__ else last
    return one_line(text)


class HarnessError(Exception):
    """A user-facing error: its message is the whole story, printed on one line."""


class HarnessWarning(UserWarning):
    """A user-facing warning (e.g. a VOC class without ground truth): the CLI prints it as one line."""


@contextlib.contextmanager
def one_line_warnings():
    """Inside, a warning prints as one line on stderr with no source line under it: a HarnessWarning as
    ``harness: warning: <message>``, a library's with its category and where it was raised, e.g.
    ``harness: warning: <message> (UserWarning at torch/utils/data/dataloader.py:627)``. The CLI runs
    every command in it."""
    with warnings.catch_warnings():  # restores warnings.showwarning on exit

        def show(message, category, filename, lineno, file=None, line=None):
            text = one_line(message)
            if not issubclass(category, HarnessWarning):
                parts = Path(filename).parts
                site = max((i for i, part in enumerate(parts) if part in ("site-packages", "dist-packages")), default=None)
                where = "/".join(parts[site + 1:] if site is not None else parts[-2:])
                text += f" ({category.__name__} at {where}:{lineno})"
            try:
                (sys.stderr if file is None else file).write(f"harness: warning: {text}\n")
            except OSError:  # stderr gone: warnings' own display ignores it too
                pass

        warnings.showwarning = show
        yield


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
