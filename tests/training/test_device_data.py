"""Data held on the device: the cached uint8 images and the batched augmentation equal the CPU presets
(bit for bit where the preset is deterministic or its random draws are shared, in distribution where
they are not), the cache file is keyed by the data spec and reused, and every row is served once
per epoch."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from training.datasets import ArrayDataset, DataSpec, FileListDataset, IndexedDataset
from training.device_data import (
    DeviceLoader,
    cached_images,
    crop_flip,
    crop_flip_params,
    normalise,
    rrc_params,
    split_preset,
)
from training.transforms import TransformSpec, build_transform

CPU = torch.device("cpu")


class PictureSet(IndexedDataset):
    """Random RGB pictures of mixed sizes, as an ImageFolder of photographs would hold."""

    def __init__(self, sizes: list[tuple[int, int]], seed: int = 0):
        super().__init__("pictures", "train", 3, [i % 3 for i in range(len(sizes))])
        rng = np.random.default_rng(seed)
        self.pics = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in sizes]
        self.reads = 0

    def load_image(self, i: int) -> Image.Image:
        self.reads += 1
        return Image.fromarray(self.pics[i], mode="RGB")


def _cpu_batch(ds: IndexedDataset, tspec: TransformSpec, train: bool) -> torch.Tensor:
    tf = build_transform(tspec, train)
    return torch.stack([tf(ds.load_image(i)) for i in range(len(ds))])


@pytest.mark.parametrize("preset,train", [("paper", True), ("plain", False), ("small", False), ("ke", False)])
def test_deterministic_presets_equal_the_cpu_path_bitwise(tmp_path, preset, train):
    ds = PictureSet([(40, 30), (23, 51), (64, 64), (17, 17)])
    tspec = TransformSpec(preset, 16, 3)
    images, aug = cached_images(ds, DataSpec(transform=preset), tspec, train, tmp_path)
    assert aug.kind == "none" and images.dtype == torch.uint8
    loader = DeviceLoader(images, ds.labels, aug, tspec, batch_size=4, device=CPU)
    x, y, idx = next(iter(loader))
    assert torch.equal(x, _cpu_batch(ds, tspec, train))
    assert idx.tolist() == [0, 1, 2, 3] and y.tolist() == [0, 1, 2, 0]


def test_grayscale_cache_equals_the_cpu_path():
    ds = PictureSet([(28, 28)] * 3)
    tspec = TransformSpec("plain", 20, 1, (0.2243,), (0.3870,))
    steps, _ = split_preset(tspec, False)
    images = torch.stack([torch.from_numpy(np.array(T.Compose(steps)(ds.load_image(i))))[None] for i in range(3)])
    assert torch.equal(normalise(images, tspec.mean, tspec.std), _cpu_batch(ds, tspec, False))


def test_small_crop_and_flip_equal_the_cpu_ops_given_the_same_draws():
    ds = PictureSet([(12, 12)] * 6, seed=3)
    tspec = TransformSpec("small", 12, 3)
    steps, aug = split_preset(tspec, True)
    assert aug.kind == "crop_flip" and aug.pad == 1
    pics = [T.Compose(steps)(ds.load_image(i)) for i in range(6)]
    x = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pics])
    top, left, flip = torch.tensor([0, 2, 1, 0, 2, 1]), torch.tensor([2, 0, 1, 1, 0, 2]), \
        torch.tensor([True, False, True, False, True, False])
    got = normalise(crop_flip(x, aug.pad, top, left, flip), tspec.mean, tspec.std)
    want = []
    for p, t, lf, f in zip(pics, top.tolist(), left.tolist(), flip.tolist()):
        q = TF.crop(TF.pad(p, aug.pad, fill=0), t, lf, 12, 12)
        q = TF.hflip(q) if f else q
        want.append(TF.normalize(TF.to_tensor(q), tspec.mean, tspec.std))
    assert torch.equal(got, torch.stack(want))


def test_crop_offsets_and_flips_follow_the_cpu_distribution():
    gen = torch.Generator().manual_seed(0)
    top, left, flip = crop_flip_params(6000, 2, gen, CPU)
    for offs in (top, left):
        counts = np.bincount(offs.numpy(), minlength=5)
        assert len(counts) == 5 and stats.chisquare(counts).pvalue > 1e-3
    assert abs(flip.float().mean().item() - 0.5) < 4 * 0.5 / np.sqrt(6000)


def test_random_resized_crop_boxes_follow_torchvision():
    h, w, n = 40, 30, 3000
    boxes = rrc_params(n, h, w, torch.Generator().manual_seed(1), CPU).numpy()
    torch.manual_seed(2)
    img = torch.zeros(1, h, w)
    ref = np.array([T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    for col in range(4):                                             # top, left, height, width
        assert stats.ks_2samp(boxes[:, col], ref[:, col]).pvalue > 1e-3, col
    assert (boxes[:, 0] + boxes[:, 2] <= h).all() and (boxes[:, 1] + boxes[:, 3] <= w).all()
    assert (boxes[:, 2] > 0).all() and (boxes[:, 3] > 0).all()


def test_ke_training_batches_have_the_training_size_and_vary_per_epoch(tmp_path):
    ds = PictureSet([(50, 50)] * 8)
    tspec = TransformSpec("ke", 16, 3)
    images, aug = cached_images(ds, DataSpec(transform="ke"), tspec, True, tmp_path)
    assert aug.kind == "rrc_flip" and images.shape[-1] == round(16 * 256 / 224)
    loader = DeviceLoader(images, ds.labels, aug, tspec, batch_size=8, device=CPU, shuffle=True)
    a = next(iter(loader))[0]
    loader.set_epoch(1)
    b = next(iter(loader))[0]
    assert a.shape == (8, 3, 16, 16) and not torch.equal(a, b)
    lo, hi = normalise(torch.tensor([[[[0]], [[0]], [[0]]], [[[255]], [[255]], [[255]]]], dtype=torch.uint8),
                       tspec.mean, tspec.std).squeeze()
    assert (a >= lo[None, :, None, None] - 1e-5).all() and (a <= hi[None, :, None, None] + 1e-5).all()


def test_cache_is_written_once_and_keyed_by_the_spec(tmp_path):
    ds = PictureSet([(20, 20)] * 5)
    tspec = TransformSpec("plain", 8, 3)
    first, _ = cached_images(ds, DataSpec(transform="plain"), tspec, False, tmp_path)
    reads = ds.reads
    again, _ = cached_images(ds, DataSpec(transform="plain"), tspec, False, tmp_path)
    assert ds.reads == reads and torch.equal(first, again)
    cached_images(ds, DataSpec(transform="plain", split_seed=1), tspec, False, tmp_path)
    assert ds.reads == reads + 5
    assert len(list(tmp_path.glob("*.pt"))) == 2 and not list(tmp_path.glob("*.tmp*"))


def test_images_edited_in_place_are_decoded_anew(tmp_path):
    files = [tmp_path / f"{i}.png" for i in range(4)]
    for i, f in enumerate(files):
        Image.fromarray(np.full((12, 12, 3), 10 * i, dtype=np.uint8)).save(f)
    ds = FileListDataset("folder", "test", files, [0, 1, 0, 1], 2)
    tspec, spec = TransformSpec("plain", 8, 3), DataSpec(transform="plain")
    first, _ = cached_images(ds, spec, tspec, False, tmp_path / "cache")
    assert int(first[2].max()) == 20
    Image.fromarray(np.full((12, 12, 3), 200, dtype=np.uint8)).save(files[2])     # same name, new pixels
    os.utime(files[2], ns=(files[2].stat().st_atime_ns, files[2].stat().st_mtime_ns + 10**9))
    again, _ = cached_images(FileListDataset("folder", "test", files, [0, 1, 0, 1], 2), spec, tspec, False,
                             tmp_path / "cache")
    assert int(again[2].min()) == 200 and torch.equal(again[[0, 1, 3]], first[[0, 1, 3]])
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1                 # replaced, not beside the stale one
    pixels = np.zeros((3, 6, 6), dtype=np.uint8)                               # an in-memory set: its pixels
    before, _ = cached_images(ArrayDataset("arr", "test", pixels, [0, 1, 0], 2), spec, tspec, False, tmp_path / "c2")
    pixels[1] = 99
    after, _ = cached_images(ArrayDataset("arr", "test", pixels, [0, 1, 0], 2), spec, tspec, False, tmp_path / "c2")
    assert int(before[1].max()) == 0 and int(after[1].min()) == 99


def test_every_row_once_per_epoch_and_ranks_disjoint():
    images = torch.zeros(10, 1, 4, 4, dtype=torch.uint8)
    tspec = TransformSpec("plain", 4, 1, (0.5,), (0.5,))
    aug = split_preset(tspec, False)[1]
    whole = DeviceLoader(images, range(10), aug, tspec, 3, CPU, shuffle=True, seed=4)
    seen = torch.cat([i for _, _, i in whole])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    ranks = [DeviceLoader(images, range(10), aug, tspec, 2, CPU, shuffle=True, seed=4, rank=r, world=2)
             for r in range(2)]
    parts = [set(torch.cat([i for _, _, i in ld]).tolist()) for ld in ranks]
    assert len(parts[0]) == len(parts[1]) == 5 and not parts[0] & parts[1]
    assert len(DeviceLoader(images, range(10), aug, tspec, 3, CPU, drop_last=True)) == 3


def test_auto_holds_images_on_cuda_only_when_they_fit(monkeypatch):
    from training.device_data import choose_data_on

    assert choose_data_on("auto", 10, CPU) == "loader" and choose_data_on("device", 10, CPU) == "device"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4_000, 8_000))
    cuda = torch.device("cuda", 0)
    assert choose_data_on("auto", 1_000, cuda) == "device"          # a quarter of the free memory at most
    assert choose_data_on("auto", 1_001, cuda) == "loader"
    with pytest.raises(Exception, match="unknown --data_on 'gpu'; valid: auto, loader, device"):
        choose_data_on("gpu", 1, CPU)


def test_training_reads_the_images_held_on_the_device(tmp_path, monkeypatch):
    from common.files import read_json
    from training.loop import TrainConfig
    from training.runner import ModelSpec, run_training

    monkeypatch.setenv("KC_DATA_CACHE", str(tmp_path / "cache"))
    data = DataSpec(image_size=16, train_images=96, transform="small")
    cfg = TrainConfig(epochs=2, batch_size=32, device="cpu", data_on="device", lr=0.02)
    res = run_training(data, ModelSpec("vgg_tiny"), cfg, tmp_path / "run")
    config = read_json(tmp_path / "run" / "config.json")
    assert config["data_on"] == "device" and config["arithmetic"]["conv_float32"] == "ieee"
    assert res.metrics["epoch"] == 2 and 0 <= res.metrics["test_top1"] <= 100
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2                    # train and test, decoded once
    run_training(data, ModelSpec("vgg_tiny"), cfg, tmp_path / "again")          # the cache is read, not rebuilt
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check runs this)")
@pytest.mark.parametrize("preset,train", [("plain", False), ("small", True), ("paper", True), ("ke", True)])
def test_on_cuda_the_loader_serves_the_cpu_loaders_batches(tmp_path, preset, train):
    """On CUDA (its own generator, roi_align crops): every row once, batches on the device, the
    deterministic presets equal to the CPU loader's to float32 rounding, augmented ones in range."""
    ds = PictureSet([(40, 30), (23, 51), (64, 64), (17, 17)] * 3)
    tspec = TransformSpec(preset, 16, 3)
    images, aug = cached_images(ds, DataSpec(transform=preset), tspec, train, tmp_path)
    cuda = torch.device("cuda", torch.cuda.current_device())
    loaders = [DeviceLoader(images, ds.labels, aug, tspec, 5, dev, shuffle=True, seed=2) for dev in (cuda, CPU)]
    for ld in loaders:
        ld.set_epoch(3)
    (gpu, cpu) = ([*ld] for ld in loaders)
    lo, hi = normalise(torch.tensor([[[[0]]], [[[255]]]], dtype=torch.uint8).expand(2, 3, 1, 1), tspec.mean, tspec.std)
    assert sorted(torch.cat([i for _, _, i in gpu]).tolist()) == list(range(12))
    for (xg, yg, ig), (xc, yc, ic) in zip(gpu, cpu):
        assert xg.device == cuda and xg.dtype == torch.float32 and xg.shape == xc.shape
        assert torch.equal(ig.cpu(), ic) and torch.equal(yg.cpu(), yc)            # the order is drawn on the CPU
        if aug.kind == "none":
            torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)
        x = xg.cpu()
        assert (x >= lo - 1e-4).all() and (x <= hi + 1e-4).all()
