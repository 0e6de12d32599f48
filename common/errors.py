"""The one error type for bad input: ``cli.py`` prints it as one paragraph, no traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: printed as one paragraph by ``cli.py``, no traceback."""


def require_choice(flag: str, value: object, choices) -> None:
    """Refuse ``value`` of option ``flag`` (e.g. ``--data_on``) unless it is one of ``choices``; the
    error names the bad value and every valid one."""
    if value not in choices:
        raise UserError(f"unknown {flag} {value!r}; valid: {', '.join(map(str, choices))}")
