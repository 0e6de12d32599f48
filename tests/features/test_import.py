"""import-features: arrays from other frameworks become a kc-features file equal to the extracted one;
token sequences and vectors become maps; misaligned sample ids are refused with the first mismatch."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.fakedata import tiny_checkpoint


def _datasets(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[...]) if isinstance(v, h5py.Dataset) else None)
    return out


def test_extract_export_import_round_trip_keeps_every_dataset_and_reads_downstream(cli, tmp_path):
    a, b = tiny_checkpoint(tmp_path / "a.pt", seed=0), tiny_checkpoint(tmp_path / "b.pt", seed=1)
    ext = tmp_path / "extracted.h5"
    code, _, err = cli("extract", "--nets", f"a={a}", f"b={b}", "--layer", "features.4", "--layer", "features.1",
                       "--logits", "--split", "test", "--limit", 12, "--dtype", "float32", "--out", ext)
    assert code == 0, err
    with h5py.File(ext, "r") as f:
        idx, lab = f["test/index"][...], f["test/label"][...]
        arrays = {n: {k: f[f"test/{n}/{k}"][...] for k in f[f"test/{n}"]} for n in ("a", "b")}
    # net a: one .npz with ids and labels; net b: a .safetensors dict plus one layer as .npy (ids from --ids)
    np.savez(tmp_path / "a.npz", index=idx, label=lab, **arrays["a"])
    save_file({k: torch.from_numpy(v) for k, v in arrays["b"].items() if k != "features.1"},
              str(tmp_path / "b.safetensors"))
    np.save(tmp_path / "b_f1.npy", arrays["b"]["features.1"])
    np.save(tmp_path / "ids.npy", idx)
    np.save(tmp_path / "labels.npy", lab)
    imp = tmp_path / "imported.h5"
    code, out, err = cli("import-features", "--net", f"a={tmp_path / 'a.npz'}",
                         "--net", f"b={tmp_path / 'b.safetensors'}",
                         "--net", f"b:features.1={tmp_path / 'b_f1.npy'}", "--ids", tmp_path / "ids.npy",
                         "--labels", tmp_path / "labels.npy", "--split", "test", "--out", imp)
    assert code == 0, err
    want, got = _datasets(ext), _datasets(imp)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    with h5py.File(imp, "r") as f:
        d = f["test/b/features.1"]
        assert d.attrs["source"] == "import-features" and d.attrs["complete"]
        assert d.attrs["source_file"].endswith("b_f1.npy") and len(d.attrs["source_sha256"]) == 64
    code, out, err = cli("inspect", imp)
    assert code == 0 and "features.4" in out, err
    code, _, err = cli("similarity", "--features", imp, "--layer", "features.4", "--split", "test", "--metric", "cka",
                       "--out_dir", tmp_path / "sim")
    assert code == 0, err


def test_token_sequences_and_vectors_become_maps_like_a_manual_reshape(cli, tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((5, 2 + 12, 3)).astype(np.float32)          # 2 prefix tokens + a 3x4 grid
    vec = rng.standard_normal((5, 7)).astype(np.float32)
    np.savez(tmp_path / "v.npz", index=np.arange(5) + 100, label=np.arange(5) % 2, blocks=tokens, pooled=vec)
    code, _, err = cli("import-features", "--net", f"v={tmp_path / 'v.npz'}", "--tokens", "grid+prefix",
                       "--prefix_tokens", 2, "--grid", "3x4", "--out", tmp_path / "t.h5")
    assert code == 0, err
    with h5py.File(tmp_path / "t.h5", "r") as f:
        grid, prefix = f["test/v/blocks"], f["test/v/blocks.prefix"]
        for h in range(3):
            for w in range(4):
                assert np.array_equal(grid[:, :, h, w], tokens[:, 2 + 4 * h + w, :])
        assert np.array_equal(prefix[:, :, :, 0], tokens[:, :2, :].transpose(0, 2, 1))
        assert grid.attrs["point"] == "tokens->grid" and int(grid.attrs["prefix_tokens"]) == 2
        assert np.array_equal(f["test/v/pooled"][...], vec[:, :, None, None])
        assert list(f["test/index"][...]) == [100, 101, 102, 103, 104]
    code, _, err = cli("import-features", "--net", f"v={tmp_path / 'v.npz'}", "--out", tmp_path / "u.h5")
    assert code != 0 and "token sequence" in err and "--tokens" in err


def test_misaligned_sample_ids_are_refused_naming_the_first_mismatch(cli, tmp_path):
    x = np.zeros((6, 2, 1, 1), np.float32)
    ids = np.arange(6)
    swapped = ids.copy()
    swapped[[3, 4]] = swapped[[4, 3]]
    np.savez(tmp_path / "a.npz", index=ids, label=ids % 2, conv=x)
    np.savez(tmp_path / "b.npz", index=swapped, label=ids % 2, conv=x)
    out = tmp_path / "f.h5"
    code, _, err = cli("import-features", "--net", f"a={tmp_path / 'a.npz'}", "--net", f"b={tmp_path / 'b.npz'}",
                       "--out", out)
    assert code != 0 and "row 3 holds sample id 4 where 'a' holds 3" in " ".join(err.split())
    assert not out.exists()


@pytest.mark.parametrize("bad,needle", [("a.txt", "is not one of"), ("a.npy", "name its layer")])
def test_bad_sources_are_named(cli, tmp_path, bad, needle):
    (tmp_path / bad).write_bytes(b"x")
    code, _, err = cli("import-features", "--net", f"a={tmp_path / bad}", "--out", tmp_path / "f.h5")
    assert code != 0 and needle in " ".join(err.split())
