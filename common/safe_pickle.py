"""Data pickles read without running code.

``pickle.load`` calls whatever a pickle names (``os.system`` through ``__reduce__``, for one), so an
untrusted data file (a downloaded CIFAR batch, a package's gzip pickles) could run code when it is
read. :func:`load_data_pickle` reads such files with an unpickler that resolves only the names plain
data needs: numpy's array and dtype reconstruction (numpy 1 and 2 module paths), numpy scalars, and
the byte-string helper of Python 3 pickles of protocol < 3. Containers, numbers, strings and bytes
need no name at all. Anything else is refused with :class:`UnsafePickleError`, naming the file and
the name.
"""
from __future__ import annotations

import os
import pickle
from typing import IO, Any

from common.errors import UserError

_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")
ALLOWED: frozenset[tuple[str, str]] = frozenset(
    [(m, "_reconstruct") for m in _NUMPY_CORE] + [(m, "scalar") for m in _NUMPY_CORE]
    + [(m, "_frombuffer") for m in _NUMPY_NUMERIC]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("codecs", "encode")]
)


class UnsafePickleError(UserError):
    """A data pickle names something other than plain data (it could run code when loaded)."""


class DataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED` names."""

    def __init__(self, file: IO[bytes], source: str, **kwargs: Any):
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.source} is refused: it names {module}.{name}, and a data file may hold only plain containers, "
            f"numbers, strings, bytes and numpy arrays (a pickle that names other objects can run code when it is "
            f"loaded). Use the official files of the data set")


def load_data_pickle(file: IO[bytes], source: str | os.PathLike, encoding: str = "ASCII") -> Any:
    """``pickle.load(file, encoding=encoding)`` restricted to plain data (module doc); ``source`` names
    the file in the error."""
    return DataUnpickler(file, str(source), encoding=encoding).load()
