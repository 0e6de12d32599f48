"""The one error type for bad input: ``cli.py`` prints it as one paragraph, no traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: printed as one paragraph by ``cli.py``, no traceback."""
