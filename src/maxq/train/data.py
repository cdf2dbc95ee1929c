"""Datasets for ``maxq train``: read offline from local files, held in memory where they fit.

* ``fashion-mnist``: the IDX files of Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``)
  or any folder with the same four ``*-ubyte.gz`` (or uncompressed) files.
* ``fashion-mnist-32``: the same images zero-padded to 32x32 (2 pixels a side), for CIFAR-size models.
* ``cifar10`` / ``cifar100``: the standard python-pickle folders (``cifar-10-batches-py``, ``cifar-100-python``).
* ``imagefolder``: an ImageNet-style ``train/`` and ``val/`` tree of class folders (decoded on the fly).
* ``synthetic``: a small random, learnable set for smoke tests.

In-memory sets return ``uint8`` images; `augment` and `normalize` run on whole batches (on the
training device), which is much faster on few cores than per-image PIL transforms.
"""

from __future__ import annotations

import gzip
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

__all__ = ["DATASETS", "DataInfo", "DatasetMissing", "load_dataset", "augment", "normalize", "FMNIST_DIR"]

log = logging.getLogger(__name__)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DatasetMissing(FileNotFoundError):
    """The dataset's files are not where we looked; the message says where and how to get them."""


@dataclass(frozen=True)
class DataInfo:
    """What the model and the loop need to know about a dataset."""

    name: str
    channels: int
    classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad: int  # random-crop padding (in-memory sets)
    flip: bool  # random horizontal flips (in-memory sets)
    in_memory: bool = True


@dataclass
class Splits:
    train: Dataset
    test: Dataset
    val: Dataset | None
    info: DataInfo


# -- Fashion-MNIST (IDX) ------------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {body.size} bytes")
    return body.reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist(data_dir: Path | None) -> tuple[TensorDataset, TensorDataset]:
    folder = Path(data_dir) if data_dir else FMNIST_DIR
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = [_find(folder, s) for s in stems]
    if any(p is None for p in paths):
        missing = [s for s, p in zip(stems, paths) if p is None]
        raise DatasetMissing(
            f"Fashion-MNIST not found: looked in {folder} for {', '.join(m + '[.gz]' for m in missing)}. "
            f"Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files land in {FMNIST_DIR}), "
            f"or pass --data-dir to a folder holding the four IDX files."
        )
    xtr, ytr, xte, yte = (_read_idx(p) for p in paths)  # type: ignore[arg-type]
    as_images = lambda x: torch.from_numpy(x.copy()).unsqueeze(1)  # noqa: E731 - [N, 1, 28, 28] uint8
    as_labels = lambda y: torch.from_numpy(y.astype(np.int64))  # noqa: E731
    return TensorDataset(as_images(xtr), as_labels(ytr)), TensorDataset(as_images(xte), as_labels(yte))


def _pad_to(sets: tuple[TensorDataset, ...], size: int) -> tuple[TensorDataset, ...]:
    """Zero-pad the ``[N, C, H, W]`` images of in-memory sets to ``size x size``, centred (labels unchanged)."""
    padded = []
    for ds in sets:
        x, y = ds.tensors
        dh, dw = size - x.shape[2], size - x.shape[3]
        if dh < 0 or dw < 0:
            raise ValueError(f"cannot pad {x.shape[2]}x{x.shape[3]} images to {size}x{size}")
        padded.append(TensorDataset(torch.nn.functional.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2)), y))
    return tuple(padded)


# -- CIFAR (python pickle) ------------------------------------------------------------------------------------


def _cifar(data_dir: Path | None, classes: int) -> tuple[TensorDataset, TensorDataset]:
    sub, train_files, test_files, key = (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels")
        if classes == 10
        else ("cifar-100-python", ["train"], ["test"], b"fine_labels")
    )
    if data_dir is None:
        raise DatasetMissing(f"CIFAR-{classes} needs --data-dir: a folder holding {sub}/ (the python version)")
    folder = Path(data_dir)
    folder = folder / sub if (folder / sub).is_dir() else folder
    missing = [f for f in train_files + test_files if not (folder / f).is_file()]
    if missing:
        raise DatasetMissing(
            f"CIFAR-{classes} not found: looked in {folder} for {missing}. Download the python version "
            f"(https://www.cs.toronto.edu/~kriz/cifar-{classes}-python.tar.gz) "
            f"and pass --data-dir to the folder that contains {sub}/."
        )

    def load(files: list[str]) -> TensorDataset:
        xs, ys = [], []
        for f in files:
            with open(folder / f, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[key], dtype=np.int64))
        return TensorDataset(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))

    return load(train_files), load(test_files)


# -- ImageFolder ----------------------------------------------------------------------------------------------


def _imagefolder(data_dir: Path | None, image_size: int) -> tuple[Dataset, Dataset, int]:
    from torchvision import datasets, transforms

    if data_dir is None or not (Path(data_dir) / "train").is_dir() or not (Path(data_dir) / "val").is_dir():
        raise DatasetMissing(
            f"imagefolder needs --data-dir with train/ and val/ subfolders of class folders (ImageNet layout); "
            f"looked in {data_dir}"
        )
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    resize = int(image_size * 256 / 224)
    train_tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    test_tf = transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    train = datasets.ImageFolder(str(Path(data_dir) / "train"), train_tf)
    test = datasets.ImageFolder(str(Path(data_dir) / "val"), test_tf)
    return train, test, len(train.classes)


# -- synthetic ------------------------------------------------------------------------------------------------


def _synthetic(size: int = 1024, classes: int = 10, image: int = 16) -> tuple[TensorDataset, TensorDataset]:
    """Learnable random images: each class is a fixed random template plus noise (seeded, reproducible)."""
    gen = torch.Generator().manual_seed(1234)
    templates = torch.rand(classes, 1, image, image, generator=gen)

    def make(n: int) -> TensorDataset:
        y = torch.randint(0, classes, (n,), generator=gen)
        x = (0.6 * templates[y] + 0.4 * torch.rand(n, 1, image, image, generator=gen)) * 255
        return TensorDataset(x.to(torch.uint8), y)

    return make(size), make(size // 4)


# -- registry -------------------------------------------------------------------------------------------------

_INFO = {
    "fashion-mnist": DataInfo("fashion-mnist", 1, 10, 28, (0.2860,), (0.3530,), pad=2, flip=True),
    "fashion-mnist-32": DataInfo("fashion-mnist-32", 1, 10, 32, (0.2190,), (0.3318,), pad=2, flip=True),
    "cifar10": DataInfo("cifar10", 3, 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), pad=4, flip=True),
    "cifar100": DataInfo("cifar100", 3, 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), pad=4, flip=True),
    "synthetic": DataInfo("synthetic", 1, 10, 16, (0.5,), (0.25,), pad=1, flip=False),
}

#: dataset name -> loader ``(data_dir, image_size) -> (train, test[, classes])``: the one lookup.
DATASETS: dict[str, Callable] = {
    "fashion-mnist": lambda d, s: _fashion_mnist(d),
    "fashion-mnist-32": lambda d, s: _pad_to(_fashion_mnist(d), 32),
    "cifar10": lambda d, s: _cifar(d, 10),
    "cifar100": lambda d, s: _cifar(d, 100),
    "imagefolder": _imagefolder,
    "synthetic": lambda d, s: _synthetic(),
}


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    val_split: float = 0.0,
    subset: int | None = None,
    image_size: int = 224,
) -> Splits:
    """Load ``name``'s train and test splits (and a held-out validation split from the training set).

    Args:
        val_split: share of the training set held out for validation (its last samples; no overlap with
            training). Use it, not the test set, for any choice you make.
        subset: train on the first ``subset`` training samples only (after the hold-out).
        image_size: crop size for ``imagefolder``.

    Raises:
        ValueError: unknown name or bad split sizes.
        DatasetMissing: the files are not there (the message says where it looked and how to get them).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    loaded = DATASETS[name](Path(data_dir) if data_dir else None, image_size)
    if name == "imagefolder":
        train, test, classes = loaded
        info = DataInfo("imagefolder", 3, classes, image_size, (0.0,) * 3, (1.0,) * 3, 0, False, in_memory=False)
    else:
        train, test = loaded
        info = _INFO[name]
    val = None
    if val_split > 0:
        total = len(train)
        held = max(1, round(total * val_split))
        idx = torch.arange(total)
        train, val = (
            torch.utils.data.Subset(train, idx[: total - held]),
            torch.utils.data.Subset(train, idx[total - held :]),
        )
    if subset is not None:
        if subset < 1:
            raise ValueError(f"subset must be >= 1, got {subset}")
        train = torch.utils.data.Subset(train, torch.arange(min(subset, len(train))))
    return Splits(train, test, val, info)


def augment(x: Tensor, info: DataInfo, generator: torch.Generator) -> Tensor:
    """Standard in-memory augmentation on a uint8 batch ``[B, C, H, W]``: random crop with zero padding
    ``info.pad`` and (if ``info.flip``) random horizontal flips. Draws from ``generator`` only, so a resumed
    epoch sees the same augmentation."""
    b, _, h, w = x.shape
    if info.pad:
        p = info.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).to(x.device)
        cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).to(x.device)
        x = padded[
            torch.arange(b, device=x.device).view(b, 1, 1, 1),
            torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1),
            rows.view(b, 1, h, 1),
            cols.view(b, 1, 1, w),
        ]
    if info.flip:
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    return x


def normalize(x: Tensor, info: DataInfo) -> Tensor:
    """uint8 ``[B, C, H, W]`` -> float, scaled to [0, 1] and standardized with the dataset's mean and std."""
    mean = torch.tensor(info.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=x.device).view(1, -1, 1, 1)
    return (x.float().div_(255) - mean) / std
