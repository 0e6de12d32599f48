"""What produced an output: code version, library versions, host, device, content hashes."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

PACKAGE_VERSION = "0.1.0"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def code_version() -> str:
    """Git commit of the workbench (``+dirty`` when the tree has changes), else the package version."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        if commit:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=_REPO_ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
            return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"kc-workbench {PACKAGE_VERSION}"


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def in_notebook_kernel() -> bool:
    """True inside a Jupyter kernel (its argv is the kernel launcher and a connection file, not a command)."""
    return bool(sys.argv) and ("ipykernel" in Path(sys.argv[0]).name or "ipykernel_launcher" in " ".join(sys.argv))


def notebook_name() -> str:
    """The notebook a kernel runs, as far as the kernel was told: Jupyter's ``JPY_SESSION_NAME``, IPython's
    ``__session__`` or VS Code's ``__vsc_ipynb_file__``; else a phrase saying it was not told."""
    name = os.environ.get("JPY_SESSION_NAME")
    if not name and "IPython" in sys.modules:
        ip = sys.modules["IPython"].get_ipython()
        ns = getattr(ip, "user_ns", {}) or {}
        name = ns.get("__session__") or ns.get("__vsc_ipynb_file__")
    return str(name) if name else "a notebook (its name was not passed to the kernel)"


def notebook_call() -> str | None:
    """The source line of the notebook cell that led to this call (the outermost cell frame), or None."""
    import inspect

    frame, found = sys._getframe(1), None
    while frame is not None:
        fn = frame.f_code.co_filename
        if "ipykernel_" in fn or fn.startswith("<ipython-input"):
            found = frame
        frame = frame.f_back
    if found is None:
        return None
    ctx = inspect.getframeinfo(found).code_context
    return ctx[0].strip() if ctx else None


def invocation() -> str:
    """What started the work: the command line, or in a notebook kernel the notebook and the call."""
    if in_notebook_kernel():
        call = notebook_call()
        return f"notebook {notebook_name()}" + (f": {call}" if call else "")
    return " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else ""


def provenance(device: str | torch.device | None = None) -> dict[str, Any]:
    """What produced an output: command line (or notebook and call), code and library versions, host and device."""
    dev = str(device) if device is not None else "cpu"
    info = {
        "command": invocation(),
        "code_version": code_version(),
        "torch_version": _torch_version(),
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "host": socket.gethostname(),
        "device": dev,
    }
    if dev.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            info["device_name"] = torch.cuda.get_device_name(torch.device(dev))
    return info


def _torch_version() -> str:
    """The torch version, without importing torch when a command did not (the similarity command)."""
    if "torch" in sys.modules:
        return sys.modules["torch"].__version__
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "not installed"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
