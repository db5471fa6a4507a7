"""Model registry for the experiment runner: a config names a model, :func:`build_model` makes it.

Registered: ``lenet300`` (784-300-100-10 MLP), ``lenet5``, ``resnet32`` (CIFAR ResNet-32 with the
paper's widths 32-64-128; ``width=16`` gives the classic 16-32-64), ``vgg19_bn`` for 32x32
inputs, and ``torchvision:NAME`` for any torchvision classification model (built with
``weights=None``: nothing is ever downloaded). Every builder takes ``num_classes`` and
``input_shape`` (one example, ``[C, H, W]``) plus its own keyword options; the same call rebuilds
a saved model from the ``meta`` block of ``model.pt`` (see :mod:`probmask.app.artifacts`).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from probmask.app.errors import UserError
from probmask.app.registry import Registry

__all__ = [
    "MODELS",
    "TORCHVISION_PREFIX",
    "build_model",
    "check_input",
    "check_model_name",
    "model_names",
    "register_model",
]

TORCHVISION_PREFIX = "torchvision:"
ModelBuilder = Callable[..., nn.Module]
MODELS: Registry[ModelBuilder] = Registry(
    "model", hint=", or torchvision:NAME for a torchvision classification model (e.g. torchvision:resnet50)"
)


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: register ``builder(num_classes, input_shape, **options)`` under ``name``."""
    if name.startswith(TORCHVISION_PREFIX):
        raise ValueError(f"model names starting with {TORCHVISION_PREFIX!r} are torchvision's")
    return MODELS.register(name)


def model_names() -> list[str]:
    """The registered names (``torchvision:NAME`` comes on top of these)."""
    return MODELS.names()


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _builder_options(builder: ModelBuilder) -> list[str]:
    params = inspect.signature(builder).parameters
    return [n for n in params if n not in ("num_classes", "input_shape")]


def check_model_name(name: str) -> None:
    """Raise :class:`UserError` listing the choices if ``name`` is not a buildable model."""
    if name.startswith(TORCHVISION_PREFIX):
        tv = name[len(TORCHVISION_PREFIX):]
        names = _torchvision_names()
        if tv not in names:
            close = difflib.get_close_matches(tv, names, n=3)
            hint = f" (did you mean {', '.join(TORCHVISION_PREFIX + c for c in close)}?)" if close else ""
            raise UserError(
                f"unknown torchvision classification model {tv!r}{hint}; list them with "
                "torchvision.models.list_models(module=torchvision.models)"
            )
    else:
        MODELS.get(name)


def build_model(name: str, num_classes: int, input_shape: Sequence[int], **options: Any) -> nn.Module:
    """Build model ``name`` for ``num_classes`` classes and examples of shape ``input_shape``.

    Raises :class:`UserError` for an unknown name or option (the message lists the valid ones).
    """
    check_model_name(name)
    shape = tuple(int(s) for s in input_shape)
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(name[len(TORCHVISION_PREFIX):], num_classes, options)
    builder = MODELS.get(name)
    allowed = _builder_options(builder)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(
            f"model {name} has no option {', '.join(unknown)}; its options are: {', '.join(allowed) or 'none'}"
        )
    return builder(num_classes=num_classes, input_shape=shape, **options)


def _torchvision_model(name: str, num_classes: int, options: dict[str, Any]) -> nn.Module:
    import torchvision

    if "weights" in options or "width" in options:
        raise UserError(f"torchvision:{name} is always built from scratch (weights=None) and has no width "
                        "option; pass its own keyword arguments under model.options")
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)
    except TypeError as err:
        raise UserError(f"torchvision:{name} does not accept these options {options}: {err}") from None


def check_input(model: nn.Module, input_shape: Sequence[int], name: str) -> None:
    """One forward pass of two zero examples; a :class:`UserError` if the shapes do not fit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_shape))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(
            f"model {name} does not accept this data's examples of shape {list(input_shape)}: {first}"
        ) from None
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------- LeNets
@register_model("lenet300")
def lenet300(num_classes: int, input_shape: tuple[int, ...], hidden: Sequence[int] = (300, 100)) -> nn.Module:
    """LeNet-300-100: an MLP on the flattened input (784-300-100-10 on MNIST)."""
    sizes = [math.prod(input_shape), *[int(h) for h in hidden]]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-1], num_classes))
    return nn.Sequential(*layers)


class LeNet5(nn.Module):
    """LeNet-5: conv 6@5x5 (padding 2) - pool - conv 16@5x5 - pool - 120 - 84 - classes."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        if len(input_shape) != 3 or min(input_shape[1:]) < 12:
            raise UserError(f"lenet5 needs images [C, H, W] of at least 12x12 pixels, got {list(input_shape)}")
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        flat = 16 * ((height // 2 - 4) // 2) * ((width // 2 - 4) // 2)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("lenet5")
def lenet5(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    return LeNet5(num_classes, input_shape)


# ---------------------------------------------------------------------------------- CIFAR ResNet
def _init_conv_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: three stages of ``n`` blocks, widths w, 2w, 4w."""

    def __init__(self, num_classes: int, in_channels: int, blocks_per_stage: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


@register_model("resnet32")
def resnet32(num_classes: int, input_shape: tuple[int, ...], width: int = 32) -> nn.Module:
    """CIFAR ResNet-32 with the paper's widths 32-64-128 (``width=16``: the classic 16-32-64)."""
    if len(input_shape) != 3:
        raise UserError(f"resnet32 needs images [C, H, W], got input shape {list(input_shape)}")
    return CifarResNet(num_classes, input_shape[0], 5, int(width))


# ---------------------------------------------------------------------------------- VGG
_VGG19 = (1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8)


class CifarVGG(nn.Module):
    """VGG with batch norm for 32x32 inputs: conv stages, global average pool, one linear layer."""

    def __init__(self, num_classes: int, in_channels: int, width: int, plan: Sequence[int | str]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                cout = int(item) * width
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model("vgg19_bn")
def vgg19_bn(num_classes: int, input_shape: tuple[int, ...], width: int = 64) -> nn.Module:
    """VGG-19 with BN for 32x32 images: 16 convs of 64..512 channels (``width`` is the first)."""
    if len(input_shape) != 3 or min(input_shape[1:]) < 16:
        raise UserError(f"vgg19_bn needs images [C, H, W] of at least 16x16 pixels, got {list(input_shape)}")
    return CifarVGG(num_classes, input_shape[0], int(width), _VGG19)
