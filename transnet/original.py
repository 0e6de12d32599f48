"""Trans-Net checkpoints saved by the original code (Liang et al., ICLR 2020): read, map, import.

    python cli.py import-transnet --checkpoint checkpoint_L30_.pth.tar --features f.h5 --source seed0 \\
        --target seed5 --layer features.30 --out_dir tn_orig

The original training script (``Training_TransNet.py``) saves ``{"epoch", "arch", "state_dict",
"optimizer"}`` with ``torch.save``; ``arch`` there names the CNN, not the Trans-Net. Its Trans-Net
(``LinearTester`` in ``Model_zoo/linearTest_sigmoidP_instance.py``: 3 bias-free conv levels and a
2-entry gate parameter by default) holds these state-dict entries, the **accepted layout** (a
``module.`` prefix, left by ``DataParallel``/DDP, is stripped; a bare state dict without the outer
dict is accepted too):

    linearLayers_conv.<j>.weight    (C_out, C_in, k, k), j = 0..K in forward order: conv j is applied
                                    j-th, conv K is the 0-order conv (our ``convs[j]``)
    nonLinearLayers_p_pre           (G,) gate logits in forward order, p = sigmoid(logit); entry j
                                    gates the ReLU after conv j (our ``gate_logits[j]``). The original
                                    always allocates 2; a net with K < G gates uses the first K.
    nonLinearLayers_p               (G,) the same gates as probabilities, accepted instead of logits
                                    (the original keeps them as a plain attribute, not in its state
                                    dict; a checkpoint re-saved by another tool may hold them)

Refused, with the keys named: the running-normalisation variant (trained with ``--modified_norm``,
i.e. instance_bn off), which also stores ``nonLinearLayers_norm`` and ``running_times`` (its inner
normalisers are running averages, not instance stds); an affine input norm (``--bn --affine``:
``linearLayers_bn.weight``/``.bias``); any other key. The layout was read from the original's
published module and training script (copies in the repositories ``nexuslrf/knowledge_consistency``
and ``ZJUICSR/AIcert``, folder ``function/formal_verify/knowledge_consistency/``; facts only, none of
their code).

Assumptions the checkpoint cannot show, recorded in ``config.json``: the input was normalised by the
per-sample spatial std (the default, no ``--bn``), convs use same padding (k // 2), the forward pass
starts at conv 0, and s uses the unbiased std (``--std_correction 1``, the original's ``var()``)
with s = 1 for 1×1 maps (also the original's rule). The imported run directory holds our
``transnet.pt`` (same layout as ``fit-transnet``'s), ``config.json`` (the source checkpoint's path
and sha256, the key mapping, the assumptions) and ``metrics.json`` (the variance report of
``--eval_split``), so ``variance``, ``consistency`` (as ``D/pairs/<A>__<B>``), ``diagnose`` and the
figures read it like a fitted run.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.checkpoints import load_checkpoint, save_checkpoint
from common.device import use_device
from common.errors import UserError, require_choice
from common.provenance import sha256_file
from common.rundir import RunDir
from transnet.config import ImportConfig  # re-exported: its old home
from transnet.convergence import verdict
from transnet.data import DATA_ON, choose_placement, make_source, open_pair
from transnet.fit import FINAL_CKPT, NO_EVAL, add_warning, in_sample_warning, model_args
from transnet.model import EPS, STD_CORRECTIONS, TransNet, TransNetConfig, n_parameters
from transnet.variance import variance_report

CONV_KEY = re.compile(r"^linearLayers_conv\.(\d+)\.weight$")
GATE_LOGITS_KEY = "nonLinearLayers_p_pre"
GATE_PROBS_KEY = "nonLinearLayers_p"
RUNNING_NORM_KEYS = ("nonLinearLayers_norm", "running_times")
INPUT_NORM_PREFIX = "linearLayers_bn."
STRIP_PREFIXES = ("module.",)
EXPECTED = (f"linearLayers_conv.0.weight ... linearLayers_conv.K.weight and {GATE_LOGITS_KEY} (logits) or "
            f"{GATE_PROBS_KEY} (probabilities)")
IMPORT_KIND = "import-transnet"
ASSUMPTIONS = ("input normalised by the per-sample, per-channel spatial std (the original's default, no --bn)",
               "same padding (kernel // 2) and the forward pass starting at conv 0",
               "inner and input normalisers: unbiased spatial std (std_correction 1) + eps 1e-5; s = 1 on 1x1 maps")


# --------------------------------------------------------------------------- the layout (pure)

def original_state(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """The tensors of a loaded checkpoint: its ``state_dict`` (or the dict itself), prefixes stripped."""
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping):
        raise UserError(f"the checkpoint's state_dict is a {type(state).__name__}, not a mapping of tensors")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = str(key)
        for prefix in STRIP_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if isinstance(value, Tensor):
            out[name] = value
    return out


def map_original(state: Mapping[str, Tensor]) -> tuple[list[Tensor], Tensor, dict[str, str]]:
    """(conv weights in forward order, gate logits of the K used gates in forward order, mapping
    original key -> our key) from an original state dict; a UserError names what is missing."""
    found = sorted(state)
    convs = {int(m.group(1)): k for k in found if (m := CONV_KEY.match(k))}
    if not convs:
        raise UserError(f"no Trans-Net conv weights in the checkpoint: expected {EXPECTED}; found "
                        f"{', '.join(found) or 'no tensors'}")
    if sorted(convs) != list(range(len(convs))):
        raise UserError(f"conv levels {sorted(convs)} are not 0..{len(convs) - 1}: expected {EXPECTED}")
    running = [k for k in RUNNING_NORM_KEYS if k in state]
    if running:
        raise UserError(f"the checkpoint holds {', '.join(running)}: it was trained with running (batch) "
                        f"normalisers (instance_bn off), which this Trans-Net does not implement; only the "
                        f"instance-std variant (the original's default) can be imported")
    affine = [k for k in found if k.startswith(INPUT_NORM_PREFIX)]
    if affine:
        raise UserError(f"the checkpoint holds {', '.join(affine)}: it was trained with an affine input norm "
                        f"(--bn --affine), which this Trans-Net does not implement; only the original's default "
                        f"input (divided by the per-sample spatial std) can be imported")
    known = set(convs.values()) | {GATE_LOGITS_KEY, GATE_PROBS_KEY}
    unknown = [k for k in found if k not in known]
    if unknown:
        raise UserError(f"unexpected keys in the checkpoint: {', '.join(unknown)}; expected only {EXPECTED}")
    k = len(convs) - 1
    weights = [state[convs[j]] for j in range(k + 1)]
    mapping = {convs[j]: f"convs.{j}.weight" for j in range(k + 1)}
    if GATE_LOGITS_KEY in state:
        gate_key, logits = GATE_LOGITS_KEY, state[GATE_LOGITS_KEY].detach().double().flatten()
    elif GATE_PROBS_KEY in state:
        gate_key = GATE_PROBS_KEY
        probs = state[GATE_PROBS_KEY].detach().double().flatten()
        if not bool(((probs >= 0) & (probs <= 1)).all()):
            raise UserError(f"{GATE_PROBS_KEY} holds {probs.tolist()}: gate probabilities must lie in [0, 1]")
        logits = torch.logit(probs)
    elif k == 0:
        gate_key, logits = None, torch.zeros(0, dtype=torch.double)
    else:
        raise UserError(f"no gate vector for the {k} gates of a {k + 1}-conv Trans-Net: expected {EXPECTED}; "
                        f"found {', '.join(found)}")
    if logits.numel() < k:
        raise UserError(f"{gate_key} has {logits.numel()} entries but the {k + 1} convs need {k} gates")
    if gate_key is not None:
        used = f"gate_logits[0:{k}]" + (f" (entries {k}..{logits.numel() - 1} unused, as in the original)"
                                         if logits.numel() > k else "")
        mapping[gate_key] = used + (" via logit(p)" if gate_key == GATE_PROBS_KEY else "")
    return weights, logits[:k], mapping


def transnet_from_original(state: Mapping[str, Tensor], std_correction: int = 1, eps: float = EPS
                           ) -> tuple[TransNet, dict[str, str]]:
    """Our TransNet (instance input norm, eval mode, float32) with the original's weights, and the key mapping."""
    weights, logits, mapping = map_original(state)
    shapes = [tuple(w.shape) for w in weights]
    bad = [f"linearLayers_conv.{j}.weight" for j, w in enumerate(weights) if not bool(torch.isfinite(w).all())]
    bad += ["the gate vector"] if not bool((~torch.isnan(logits)).all()) else []
    if bad:
        raise UserError(f"non-finite values in {', '.join(bad)}: the original fit diverged or the file is damaged")
    if any(len(s) != 4 or s[2] != s[3] or s[2] % 2 == 0 for s in shapes):
        raise UserError(f"conv weights must be (C_out, C_in, k, k) with one odd k; got {shapes}")
    if len({s[2] for s in shapes}) != 1:
        raise UserError(f"the convs have different kernel sizes: {shapes}")
    c_in, c_out, kernel = shapes[0][1], shapes[-1][0], shapes[0][2]
    for j, s in enumerate(shapes[:-1]):
        if s[:2] != (c_in, c_in):
            raise UserError(f"conv {j} is {s[1]} -> {s[0]} channels, but every inner conv must keep the source's "
                            f"{c_in} channels (x̂ is re-injected at every level); shapes: {shapes}")
    if shapes[-1][1] != c_in:
        raise UserError(f"the last conv takes {shapes[-1][1]} channels, the others {c_in}; shapes: {shapes}")
    model = TransNet(TransNetConfig(c_in, len(weights) - 1, kernel, "instance", out_channels=c_out, eps=eps,
                                    std_correction=std_correction))
    with torch.no_grad():
        for conv, w in zip(model.convs, weights):
            conv.weight.copy_(w.detach().float())
        if model.orders:
            model.gate_logits.copy_(logits.float())
    return model.eval(), mapping


# --------------------------------------------------------------------------- the command

def import_transnet(cfg: ImportConfig, out_dir: str | os.PathLike, mode: str = "new") -> dict[str, Any]:
    """Load the original checkpoint, check it against the features, and write an imported run directory
    (``transnet.pt``, ``config.json``, ``metrics.json``); return the metrics."""
    for name in ("checkpoint", "features", "source", "target", "layer"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required")
    if cfg.std_correction not in STD_CORRECTIONS:
        raise UserError(f"--std_correction must be 0 or 1 (the original: 1), got {cfg.std_correction!r}")
    require_choice("--data_on", cfg.data_on, DATA_ON)
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {cfg.batch_size}")
    path = Path(cfg.checkpoint)
    raw = load_checkpoint(path)
    model, mapping = transnet_from_original(original_state(raw), cfg.std_correction)
    sha = sha256_file(path)
    file_keys = sorted(str(k) for k in raw.get("state_dict", raw))       # as stored, before prefixes are stripped

    split = cfg.eval_split if cfg.eval_split != NO_EVAL else cfg.train_split
    pair = open_pair(cfg.features, cfg.source, cfg.target, cfg.layer, split, cfg.target_features,
                     cfg.allow_changed_checkpoints)
    if (pair.shape_a[0], pair.shape_b[0]) != (model.channels, model.out_channels):
        raise UserError(f"{path} maps {model.channels} -> {model.out_channels} channels, but "
                        f"{pair.dataset_path('a')} -> {pair.dataset_path('b')} has {pair.shape_a[0]} -> "
                        f"{pair.shape_b[0]}; is it the Trans-Net of this pair and layer?")
    imported = {"from": str(path.resolve()), "sha256": sha, "mapping": mapping, "assumptions": list(ASSUMPTIONS),
                "original_epoch": raw.get("epoch"), "original_arch": raw.get("arch"),
                "found_keys": file_keys, "stripped_prefixes": sorted({x for k in file_keys for x in STRIP_PREFIXES
                                                                      if k.startswith(x)})}
    dev = use_device(cfg.device)
    root = pair.provenance_a.get("root", {})
    with RunDir(out_dir, mode) as run:
        run.write_config(asdict(cfg), device=dev, kind=IMPORT_KIND, imported=imported, model_args=model_args(model),
                         n_parameters=n_parameters(model))
        metrics: dict[str, Any] = {"source": cfg.source, "target": cfg.target, "layer": cfg.layer,
                                   "split": split, "imported": True}
        if cfg.eval_split != NO_EVAL:
            src = make_source(pair, dev, choose_placement(pair.nbytes, dev, cfg.data_on))
            rep = variance_report(model.to(dev), src.sequential(cfg.batch_size), device=dev, split=split,
                                  source=pair.source, target=pair.target, layer=pair.layer)
            model.cpu()
            rep["held_out"] = split != cfg.train_split
            if not rep["held_out"]:
                add_warning(rep, in_sample_warning(split, cfg.train_split), first=True)
            metrics = {**rep, "imported": True}
        epochs = int(raw.get("epoch") or 0)                 # no curve of the original fit: at best "unknown"
        metrics["convergence"] = verdict([], metrics, epochs, epochs)
        metrics.update({"train_split": cfg.train_split, "std_correction": cfg.std_correction,
                        "source_checkpoint_sha256": sha, "features": str(Path(cfg.features).resolve())})
        ck = {"state_dict": model.state_dict(), "arch": "transnet", "kind": "transnet", "num_classes": None,
              "dataset": root.get("dataset"), "transform": root.get("transform"), "epoch": raw.get("epoch"),
              "metrics": metrics, "config": asdict(cfg), "model_args": model_args(model), "alphas": None,
              "source": cfg.source, "target": cfg.target, "layer": cfg.layer,
              "features": str(Path(cfg.features).resolve()),
              "target_features": str(Path(cfg.target_features or cfg.features).resolve()),
              "feature_provenance": {"eval": {"source": pair.provenance_a, "target": pair.provenance_b}},
              "norm_stats": {"input_norm": "instance", "input_std": None, "target_var": None},
              "imported": imported}
        save_checkpoint(run.file(FINAL_CKPT), ck)
        run.finish(metrics)
    return metrics

