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


def test_augment_is_seeded_and_keeps_shape():
    splits = load_dataset("synthetic")
    x = torch.stack([splits.train[i][0] for i in range(16)])
    a = augment(x, splits.info, torch.Generator().manual_seed(3))
    b = augment(x, splits.info, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == torch.uint8
    z = normalize(a, splits.info)
    assert z.dtype == torch.float32 and z.shape == x.shape


def test_unknown_dataset_and_bad_split():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist-ultra")
    with pytest.raises(ValueError, match="val_split"):
        load_dataset("synthetic", val_split=1.5)
