"""The one error type for bad input: ``cli.py`` prints it as one paragraph, no traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: printed as one paragraph by ``cli.py``, no traceback."""


def user_message(e: UserError) -> str:
    """The paragraph to print for ``e``. A UserError raised in a DataLoader worker reaches the main
    process re-raised as ``UserError(<the worker's traceback>)``: its own message is the text after the
    traceback's last ``UserError: ``, and the worker is named."""
    text = str(e)
    if "Original Traceback" not in text or "UserError: " not in text:
        return text
    where = text.splitlines()[0].removeprefix("Caught UserError ").rstrip(".")   # "in DataLoader worker process 1"
    return f"{text.rsplit('UserError: ', 1)[1].strip()} (raised {where})"


def require_choice(flag: str, value: object, choices) -> None:
    """Refuse ``value`` of option ``flag`` (e.g. ``--data_on``) unless it is one of ``choices``; the
    error names the bad value and every valid one."""
    if value not in choices:
        raise UserError(f"unknown {flag} {value!r}; valid: {', '.join(map(str, choices))}")
