"""One plain-text line summarising a Trans-Net's variance report (``metrics.json`` or
``variance.json``), printed by ``fit-transnet``, ``variance`` and ``import-transnet`` and shown in notebooks."""
from __future__ import annotations

from typing import Any


def summary_line(m: dict[str, Any]) -> str:
    num = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731  (null after a non-finite value)
    fr = ", ".join(f"Y{k} {num(v, '.3f')}" for k, v in enumerate(m["fraction_orders"]))
    gates = ", ".join(f"{g:.3f}" for g in m.get("gates", []))
    where = "held-out" if m.get("held_out", True) else "in-sample"
    line = (f"{m['source']} -> {m['target']} at {m['layer']}: {where} R² {num(m['r2'], '.4f')} on {m['split']} "
            f"(n={m['n_samples']}); variance fractions {fr}, residual {num(m['fraction_residual'], '.3f')}"
            + (f"; gates (order 1 first) {gates}" if gates else ""))
    conv = m.get("convergence")
    if isinstance(conv, dict) and conv.get("verdict"):
        why = "; ".join(str(r) for r in conv.get("reasons") or [])
        after = (f" after {conv['epochs_run']} of {conv['epochs_max']} epochs"
                 if conv.get("epochs_run") is not None and conv.get("epochs_max") is not None else "")
        line += f"\nconvergence: {conv['verdict']}{after}" + (f" ({why})" if why else "")
    warns = m.get("warnings") or ([m["warning"]] if m.get("warning") else [])
    return line + "".join(f"\nwarning: {w}" for w in warns)
