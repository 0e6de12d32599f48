"""The numeric precisions a stage may compute in (``--precision``), named without importing torch so
that parsers can offer them; what each means and how it is applied lives in :mod:`common.device`."""
from __future__ import annotations

PRECISIONS = ("fp32", "tf32", "bf16")
