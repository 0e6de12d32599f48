"""``import-features``: features computed by any framework into a kc-features v1 file."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.options import Command, add_dataclass_args, dataclass_from_args
from common.ranges import nonneg_int
from features.config import DTYPES, TOKEN_MODES, ImportConfig
from features.recorded import command_line

IMPORT_HELP = {
    "split": "the split these rows are (train, test, val)",
    "dtype": "storage dtype of the layers (logits: float32); float16 refuses values beyond its range",
    "tokens": "(N, T, C) arrays: grid (patch tokens as a (C, H, W) grid, --prefix_tokens dropped), grid+prefix "
              "(also <layer>.prefix), sequence (C x T x 1); none refuses them",
    "prefix_tokens": "leading class/distillation/register tokens of a token sequence",
    "grid": "HxW of the patch grid (default: a square of T - prefix_tokens)",
    "ids_key": "key of the sample ids in a dict file", "labels_key": "key of the labels in a dict file",
    "dataset": "root attribute: the data set the features were computed on",
    "image_size": "root attribute: input size in px (0: unknown)", "block_rows": "rows per write",
}


def _add_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("--net", action="append", required=True, metavar="NAME=FILE | NAME:LAYER=FILE",
                   help="arrays of net NAME: a .npz/.pt/.safetensors dict (every key a layer but the ids and "
                        "labels) or one .npy layer; repeat for more nets and layers")
    p.add_argument("--ids", default=None, help=".npy of the sample ids (for nets whose files hold none)")
    p.add_argument("--labels", default=None, help=".npy of the labels (for nets whose files hold none)")
    p.add_argument("--out", required=True, help="the kc-features file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out")
    add_dataclass_args(p.add_argument_group("import"), ImportConfig, help=IMPORT_HELP,
                       choices={"tokens": list(TOKEN_MODES), "dtype": list(DTYPES)},
                       types={"image_size": nonneg_int()})           # 0: the input size is unknown


def _one_array(path: str | None, what: str) -> np.ndarray | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--{what} {p} does not exist")
    from features.importer import read_arrays

    arrays = read_arrays(p)
    if len(arrays) != 1:
        raise UserError(f"--{what} {p} holds {len(arrays)} arrays; give a file of one 1-D array")
    return np.asarray(next(iter(arrays.values())))


def _run_import(args: argparse.Namespace) -> int:
    from features.importer import import_features, parse_source

    cfg = dataclass_from_args(ImportConfig, args)
    res = import_features([parse_source(s) for s in args.net], args.out, cfg, _one_array(args.ids, "ids"),
                          _one_array(args.labels, "labels"), args.overwrite, command_line(args, "import-features"))
    print(f"{res.out}: {len(res.datasets)} datasets, {res.rows} rows of split {cfg.split!r} "
          f"({', '.join(d.split('/', 1)[1] for d in res.datasets)})")
    return 0


COMMANDS = [
    Command("import-features", "write features computed elsewhere as a kc-features file", _add_import, _run_import,
            "Import (N, C, H, W), (N, T, C) or (N, D) arrays per net and layer from .npy, .npz, .pt or .safetensors "
            "files with their sample ids and labels into a kc-features v1 file. Every net must hold the same sample "
            "ids in the same order; provenance (source files and their sha256, the command) is recorded, and every "
            "downstream command reads the file like an extracted one."),
]
