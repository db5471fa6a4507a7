"""Tiny data sets in the on-disk layouts the runner reads (MNIST idx, CIFAR pickles, ImageFolder)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torchvision
from PIL import Image

# a small, fast run: LeNet-300-100's shape with narrow hidden layers, a few hundred digits; K=2 mask
# samples per batch (the default is 1), so that the multi-sample path is what the runner tests exercise
TINY = [
    "model.options.hidden=[32,16]", "data.train_size=768", "data.test_size=200", "train.batch_size=64",
    "train.samples=2", "train.epochs=4", "finetune.epochs=2", "prune.sparsity=0.9",
]


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 40, n_test: int = 20) -> Path:
    """``root/<folder>/raw`` with the four idx files torchvision's MNIST / FashionMNIST read."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def write_cifar(root: Path, monkeypatch: pytest.MonkeyPatch, classes: int = 10, per_file: int = 12) -> Path:
    """The CIFAR-10 / CIFAR-100 python pickles with random images; the md5 check is switched off."""
    rng = np.random.default_rng(0)

    def batch(n: int, label_key: str) -> dict:
        return {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                label_key: [int(i % classes) for i in range(n)]}

    if classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        files = {f"data_batch_{i}": batch(per_file, "labels") for i in range(1, 6)}
        files["test_batch"] = batch(per_file, "labels")
        files["batches.meta"] = {"label_names": [f"c{i}" for i in range(10)]}
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        files = {"train": batch(5 * per_file, "fine_labels"), "test": batch(per_file, "fine_labels"),
                 "meta": {"fine_label_names": [f"c{i}" for i in range(classes)]}}
    for name, content in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(content, f)
    # torchvision checks the real files' md5 sums; these files are ours
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    return root


def write_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 40) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` with random RGB images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root
