"""Data registry: the bundled split, the torchvision sets from files on disk, ImageFolder, and errors."""

from __future__ import annotations

import pytest
import torch

from probmask.app.config import DataConfig
from probmask.app.data import CIFAR10_STATS, CIFAR100_STATS, dataset_names, load_data
from probmask.app.errors import UserError
from runner_util import write_cifar, write_image_folder, write_mnist


def _labels(ds) -> torch.Tensor:
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))])


def test_registry_names():
    assert dataset_names() == ["cifar10", "cifar100", "fashion_mnist", "imagenet", "mnist", "mnist5k"]


def test_mnist5k_is_a_fixed_stratified_4000_1000_split():
    a, b = load_data(DataConfig()), load_data(DataConfig())
    assert (len(a.train), len(a.test)) == (4000, 1000)
    assert a.num_classes == 10 and a.input_shape == (1, 28, 28)
    assert torch.bincount(a.train.tensors[1]).tolist() == [400] * 10
    assert torch.bincount(a.test.tensors[1]).tolist() == [100] * 10
    for x, y in ((a.train, b.train), (a.test, b.test)):  # the same split every time
        assert torch.equal(x.tensors[0], y.tensors[0]) and torch.equal(x.tensors[1], y.tensors[1])
    train_rows = {row.numpy().tobytes() for row in a.train.tensors[0].flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in a.test.tensors[0].flatten(1))
    x = a.train.tensors[0]
    assert x.shape[1:] == (1, 28, 28) and abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2
    assert a.train_eval is a.train  # no augmentation on MNIST


def test_subsets_are_fixed_and_mixed():
    cfg = DataConfig(train_size=300, test_size=50)
    a, b = load_data(cfg), load_data(cfg)
    assert (len(a.train), len(a.test), len(a.train_eval)) == (300, 50, 300)
    assert torch.equal(_labels(a.train), _labels(b.train))
    assert len(set(_labels(a.train).tolist())) == 10  # every class present


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_and_fashion_mnist_from_idx_files(tmp_path, name, folder):
    write_mnist(tmp_path, folder)
    splits = load_data(DataConfig(name=name, root=str(tmp_path)))
    assert (len(splits.train), len(splits.test)) == (40, 20)
    x, y = splits.train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and int(y) == 3
    assert splits.num_classes == 10 and splits.input_shape == (1, 28, 28)


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_with_standard_augmentation(tmp_path, monkeypatch, classes):
    write_cifar(tmp_path, monkeypatch, classes=classes)
    splits = load_data(DataConfig(name=f"cifar{classes}", root=str(tmp_path)))
    assert splits.num_classes == classes and splits.input_shape == (3, 32, 32)
    assert len(splits.train) == len(splits.train_eval) == 60 and len(splits.test) == 12
    torch.manual_seed(0)
    draws = [splits.train[0][0] for _ in range(6)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # random crop / flip
    assert torch.equal(splits.train_eval[0][0], splits.train_eval[0][0])  # no augmentation
    assert torch.equal(splits.test[0][0], splits.test[0][0])
    # crops of the image padded by 4 show the zero padding: a whole border row or column of
    # the normalized black value in some draw (all 20 crops centred has chance 81**-20)
    mean, std = torch.tensor(CIFAR10_STATS[0] if classes == 10 else CIFAR100_STATS[0]), torch.tensor(
        CIFAR10_STATS[1] if classes == 10 else CIFAR100_STATS[1])
    black = (-mean / std).view(3, 1)
    draws += [splits.train[0][0] for _ in range(14)]

    def padded(img):
        edges = [img[:, 0, :], img[:, -1, :], img[:, :, 0], img[:, :, -1]]
        return any(torch.allclose(e, black.expand_as(e), atol=1e-5) for e in edges)

    assert any(padded(d) for d in draws)
    assert not padded(splits.train_eval[0][0])


def test_imagenet_image_folder(tmp_path):
    write_image_folder(tmp_path, classes=3)
    splits = load_data(DataConfig(name="imagenet", root=str(tmp_path), image_size=32))
    assert splits.num_classes == 3 and splits.input_shape == (3, 32, 32)
    assert len(splits.train) == len(splits.test) == 12
    assert splits.train[0][0].shape == splits.test[0][0].shape == (3, 32, 32)
    assert torch.equal(splits.test[5][0], splits.test[5][0])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mnist", "MNIST not found under data.root="),
        ("fashion_mnist", "Fashion-MNIST not found under data.root="),
        ("cifar10", "CIFAR-10 not found under data.root="),
        ("cifar100", "CIFAR-100 not found under data.root="),
    ],
)
def test_missing_torchvision_data_says_how_to_get_it(tmp_path, name, expected):
    with pytest.raises(UserError) as info:
        load_data(DataConfig(name=name, root=str(tmp_path / "nothing")))
    message = str(info.value)
    assert expected in message and "data.download=true" in message
    assert not (tmp_path / "nothing").exists() or not any((tmp_path / "nothing").rglob("*.gz"))


TORCHVISION_FOLDERS = {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw", "cifar10": "cifar-10-batches-py",
                       "cifar100": "cifar-100-python"}


@pytest.mark.parametrize("name", sorted(TORCHVISION_FOLDERS))
def test_a_failed_download_of_any_torchvision_set_says_what_to_put_under_the_root(tmp_path, monkeypatch, name):
    """Offline: torchvision's download raises (MNIST wraps it in a RuntimeError after trying its
    mirrors, CIFAR lets the URLError through); either way one UserError naming the folder."""
    import urllib.error

    import torchvision.datasets.cifar
    import torchvision.datasets.mnist

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    for module in (torchvision.datasets.mnist, torchvision.datasets.cifar):
        monkeypatch.setattr(module, "download_and_extract_archive", offline)
    with pytest.raises(UserError) as info:
        load_data(DataConfig(name=name, root=str(tmp_path), download=True))
    message = str(info.value)
    assert message.startswith("downloading ") and "failed" in message
    assert str(tmp_path / TORCHVISION_FOLDERS[name]) in message and "data.download=false" in message


@pytest.mark.parametrize("name", sorted(TORCHVISION_FOLDERS))
def test_damaged_torchvision_files_are_a_user_error(tmp_path, name):
    folder = tmp_path / TORCHVISION_FOLDERS[name]
    folder.mkdir(parents=True)
    for file in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte", "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch", "batches.meta", "train", "test", "meta"):
        (folder / file).write_bytes(b"\x00garbage")
    with pytest.raises(UserError) as info:
        load_data(DataConfig(name=name, root=str(tmp_path)))
    assert str(folder) in str(info.value)


def test_missing_imagenet_says_what_layout_is_needed(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError) as info:
        load_data(DataConfig(name="imagenet", root=str(tmp_path)))
    assert "train/ and val/" in str(info.value) and str(tmp_path / "val") in str(info.value)
    assert "cannot download" in str(info.value)


def test_imagenet_with_different_class_folders_is_refused(tmp_path):
    write_image_folder(tmp_path, classes=2)
    write_image_folder(tmp_path / "more", classes=3)
    (tmp_path / "more" / "val").rename(tmp_path / "val2")
    import shutil

    shutil.rmtree(tmp_path / "val")
    (tmp_path / "val2").rename(tmp_path / "val")
    with pytest.raises(UserError, match="both need the same class folders"):
        load_data(DataConfig(name="imagenet", root=str(tmp_path), image_size=32))


def test_unknown_data_set_lists_the_choices():
    with pytest.raises(UserError, match="unknown data set 'cifar1000': choose one of cifar10, cifar100"):
        load_data(DataConfig(name="cifar1000"))
