"""Dataset readers on small fake copies of the real file formats (offline, no downloads)."""

import gzip
import pickle

import numpy as np
import pytest
import torch

from maxq.train.data import DatasetMissing, augment, load_dataset, normalize


def _idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("t10k", 20)):
        _idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    splits = load_dataset("fashion-mnist", tmp_path, val_split=0.2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 20)
    x, y = splits.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.uint8 and 0 <= int(y) < 10


def test_fashion_mnist_32_pads_every_image_centred(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("t10k", 4)):
        _idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(1, 255, (n, 28, 28)))  # no zero pixels
        _idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    plain = load_dataset("fashion-mnist", tmp_path, val_split=0.2)
    padded = load_dataset("fashion-mnist-32", tmp_path, val_split=0.2)
    assert padded.info.image_size == 32 and padded.info.channels == 1
    assert (len(padded.train), len(padded.val), len(padded.test)) == (8, 2, 4)
    for split in ("train", "val", "test"):
        (x28, y28), (x32, y32) = getattr(plain, split)[1], getattr(padded, split)[1]
        assert x32.shape == (1, 32, 32) and int(y28) == int(y32)
        assert torch.equal(x32[:, 2:30, 2:30], x28)  # the image, centred
        assert int(x32.sum()) == int(x28.sum())  # and a zero border of 2 pixels around it
    z = normalize(torch.stack([padded.train[i][0] for i in range(8)]), padded.info)
    assert z.shape == (8, 1, 32, 32)


def test_truncated_idx_is_reported(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        _idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (5, 28, 28)))
        _idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (5,)))
    raw = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("fashion-mnist", tmp_path)


def test_cifar_pickle_folders(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 255, (4, 3072)).astype(np.uint8), b"labels": list(rng.integers(0, 10, 4))}
        (root / name).write_bytes(pickle.dumps(batch))
    splits = load_dataset("cifar10", tmp_path)
    assert len(splits.train) == 20 and len(splits.test) == 4
    assert splits.train[0][0].shape == (3, 32, 32) and splits.info.classes == 10
    with pytest.raises(DatasetMissing, match="cifar-100-python"):
        load_dataset("cifar100", tmp_path)


def test_imagefolder_tree(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((40, 40, 3), 60 * i, dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    splits = load_dataset("imagefolder", tmp_path, image_size=32)
    assert splits.info.classes == 2 and not splits.info.in_memory
    x, label = splits.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and label in (0, 1)


def _crop_and_flip_of(source: torch.Tensor, out: torch.Tensor, pad: int) -> set[tuple[int, int, bool]]:
    """Every ``(dy, dx, flipped)`` such that ``out`` is that crop of ``source`` zero-padded by ``pad``, mirrored
    left-right if ``flipped``."""
    h, w = source.shape[-2:]
    padded = torch.nn.functional.pad(source, (pad, pad, pad, pad))
    found = set()
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            for flipped in (False, True):
                if torch.equal(out, crop.flip(-1) if flipped else crop):
                    found.add((dy, dx, flipped))
    return found


@pytest.mark.parametrize("name", ["synthetic", "cifar10", "fashion-mnist"])
def test_augment_is_a_padded_random_crop_and_flip(name):
    from maxq.train.data import _INFO

    info = _INFO[name]
    gen = torch.Generator().manual_seed(0)
    # Values 1..255: the zero padding cannot be mistaken for image content, and every crop is unique.
    x = torch.randint(1, 256, (400, info.channels, info.image_size, info.image_size), dtype=torch.uint8, generator=gen)
    a = augment(x, info, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, augment(x, info, torch.Generator().manual_seed(3)))  # seeded by the generator only
    assert not torch.equal(a, augment(x, info, torch.Generator().manual_seed(4)))
    seen = []
    for i in range(len(x)):
        found = _crop_and_flip_of(x[i], a[i], info.pad)
        assert len(found) == 1, f"sample {i}: not a padded crop (+flip) of its input"
        seen.append(found.pop())
    offsets = {(dy, dx) for dy, dx, _ in seen}
    # Every offset in [0, 2 * pad] on both axes occurs (400 draws over at most 81 offsets), so crops do move.
    assert offsets == {(dy, dx) for dy in range(2 * info.pad + 1) for dx in range(2 * info.pad + 1)}
    flips = sum(f for _, _, f in seen)
    if info.flip:
        assert 140 < flips < 260  # about half (binomial 400, 1/2: mean 200, sd 10)
    else:
        assert flips == 0


def test_normalize_is_scaled_and_standardized_per_channel():
    from maxq.train.data import _INFO

    info = _INFO["cifar10"]
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    z = normalize(x, info)
    assert z.dtype == torch.float32 and z.shape == x.shape
    expected = torch.empty(x.shape, dtype=torch.float64)
    for c in range(3):
        expected[:, c] = (x[:, c].double() / 255 - info.mean[c]) / info.std[c]
    torch.testing.assert_close(z.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(x, before)  # the input is not modified in place
    # Known points: 0 -> -mean/std, 255 -> (1 - mean)/std.
    edges = normalize(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2), info)
    for c in range(3):
        assert edges[0, c, 0, 0].item() == pytest.approx(-info.mean[c] / info.std[c], rel=1e-6)
        assert edges[0, c, 0, 1].item() == pytest.approx((1 - info.mean[c]) / info.std[c], rel=1e-6)


def test_unknown_dataset_and_bad_split():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist-ultra")
    with pytest.raises(ValueError, match="val_split"):
        load_dataset("synthetic", val_split=1.5)
