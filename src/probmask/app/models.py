"""Model registry for the experiment runner: a config names a model, :func:`build_model` makes it.

Registered: ``lenet300`` (784-300-100-10 MLP), ``lenet5``, ``resnet32`` (CIFAR ResNet-32 with the
paper's widths 32-64-128; ``width=16`` gives the classic 16-32-64), ``vgg19_bn`` for 32x32
inputs, ``vit_tiny`` (a small Vision Transformer, :mod:`probmask.app.vit`), and
``torchvision:NAME`` for any torchvision classification model (built with ``weights=None``:
nothing is ever downloaded). Every builder takes ``num_classes`` and
``input_shape`` (one example, ``[C, H, W]``) plus its own keyword options; the same call rebuilds
a saved model from the ``meta`` block of ``model.pt`` (see :mod:`probmask.app.artifacts`).

A model may declare two things about its pruning, read by :func:`prune_include` and
:func:`parameter_roles` (``vit_tiny`` declares both; models without them are pruned and reported
per layer as usual):

* ``prune_include``: a tuple of ``fnmatch`` patterns of parameters to prune beyond the default
  ``nn.Linear`` / ``nn.Conv*`` weights (e.g. ``"*.in_proj_weight"`` of ``nn.MultiheadAttention``).
  The runner prunes them unless ``prune.include`` is set, which then replaces them;
  ``prune.exclude`` keeps any of them dense.
* ``parameter_role(name) -> str | None``: the role of a prunable parameter (e.g. "MLP"), by which
  ``results.json``, the printed report and the per-layer plot group the layers.

A model file's metadata is data, not instructions: before building anything for real,
:mod:`probmask.app.artifacts` checks ``input_shape`` with :func:`check_input_shape` and builds a
*skeleton* with :func:`build_skeleton` (tensors of more than :data:`SKELETON_REAL_ELEMENTS` elements
on PyTorch's ``meta`` device, which allocates nothing) to compare every parameter and buffer
shape with the file's weights.
"""

from __future__ import annotations

import difflib
import inspect
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from probmask.app.errors import UserError
from probmask.app.registry import Registry

__all__ = [
    "MODELS",
    "MAX_INPUT_ELEMENTS",
    "TORCHVISION_PREFIX",
    "build_model",
    "build_skeleton",
    "check_input",
    "check_input_shape",
    "check_model_name",
    "model_names",
    "parameter_roles",
    "prune_include",
    "register_model",
]

TORCHVISION_PREFIX = "torchvision:"
MAX_INPUT_ELEMENTS = 2**24  # elements of one example (e.g. [3, 2364, 2364]); larger shapes are refused
SKELETON_REAL_ELEMENTS = 2**16  # build_skeleton makes tensors up to this size for real, larger ones on meta
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


def prune_include(model: nn.Module) -> list[str]:
    """The parameter-name patterns ``model`` declares prunable beyond the default selection
    (its ``prune_include`` attribute; empty if it has none)."""
    patterns = getattr(model, "prune_include", ())
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{type(model).__name__}.prune_include must be a tuple of strings, got {patterns!r}")
    return list(patterns)


def parameter_roles(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """``{name: role}`` for the parameters ``names`` by ``model.parameter_role`` (names it gives no
    role are "other"); empty if the model declares no roles."""
    role_of = getattr(model, "parameter_role", None)
    if role_of is None:
        return {}
    roles = {name: role_of(name) for name in names}
    return {name: role if role is not None else "other" for name, role in roles.items()}


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


def check_input_shape(input_shape: object) -> tuple[int, ...]:
    """``input_shape`` as a tuple if it is a plausible example shape: a list of 1 to 3 positive
    integers (``[C, H, W]``, or ``[features]``) with at most :data:`MAX_INPUT_ELEMENTS` elements;
    a :class:`UserError` saying what is wrong otherwise."""
    shown = repr(input_shape) if len(repr(input_shape)) <= 60 else repr(input_shape)[:57] + "..."
    if (not isinstance(input_shape, (list, tuple)) or not 1 <= len(input_shape) <= 3
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in input_shape)):
        raise UserError(f"input_shape must be a list of 1 to 3 integers ([C, H, W]), got {shown}")
    if min(input_shape) < 1:
        raise UserError(f"input_shape must be positive, got {shown}")
    if math.prod(input_shape) > MAX_INPUT_ELEMENTS:
        raise UserError(f"input_shape {shown} has {math.prod(input_shape):,} elements per example; "
                        f"probmask takes at most {MAX_INPUT_ELEMENTS:,} (2**24)")
    return tuple(input_shape)


def _numel(value: Any) -> int:
    from torch.utils._pytree import tree_flatten

    return sum(t.numel() for t in tree_flatten(value)[0] if isinstance(t, Tensor))


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, Tensor) and value.device.type != "meta" else value


class _LargeOnMeta(TorchFunctionMode):
    """Every tensor of more than ``limit`` elements is made on the meta device (no memory, no data).

    Factory functions (``torch.empty``, ``zeros``, ...) and operations on real tensors first run on
    meta copies to learn the result's size; small results are then computed for real, so that a
    builder can still read small tensors (``torchvision``'s RegNets call ``.tolist()`` on one).
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        from torch.utils._device import _device_constructors

        self.limit = limit
        self.constructors = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        from torch.utils._pytree import tree_flatten, tree_map

        kwargs = kwargs or {}
        if func in self.constructors:
            if kwargs.get("device") is None:
                probe = func(*args, **{**kwargs, "device": "meta"})
                if _numel(probe) > self.limit:
                    return probe
            return func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        if all(t.device.type == "meta" for t in tensors):  # also: no tensors at all
            return func(*args, **kwargs)
        try:
            probe = func(*tree_map(_to_meta, args), **tree_map(_to_meta, kwargs))
        except Exception:  # reads data (.tolist(), .item()): only small tensors are real
            return func(*args, **kwargs)
        if any(t.device.type == "meta" for t in tensors) or _numel(probe) > self.limit:
            return probe
        return func(*args, **kwargs)


@contextmanager
def _registration_budget(max_tensors: int, max_modules: int, what: str) -> Iterator[None]:
    """Abort (:class:`UserError`) a builder on this thread once it registers more than
    ``max_tensors`` parameters and buffers or more than ``max_modules`` submodules."""
    from torch.nn.modules import module as module_mod

    owner = threading.get_ident()
    counts = {"tensors": 0, "modules": 0}

    def count(kind: str, limit: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            if threading.get_ident() != owner:
                return
            counts[kind] += 1
            if counts[kind] > limit:
                noun = "parameters and buffers" if kind == "tensors" else "submodules"
                raise UserError(f"{what} makes more than {limit:,} {noun}, more than the file's weights can fill")

        return hook

    handles = [
        module_mod.register_module_parameter_registration_hook(count("tensors", max_tensors)),
        module_mod.register_module_buffer_registration_hook(count("tensors", max_tensors)),
        module_mod.register_module_module_registration_hook(count("modules", max_modules)),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def build_skeleton(name: str, num_classes: int, input_shape: Sequence[int], *, max_tensors: int | None = None,
                   **options: Any) -> nn.Module:
    """:func:`build_model` without allocating memory: every tensor of more than
    :data:`SKELETON_REAL_ELEMENTS` elements is a meta tensor (shape and dtype, no data).

    For checking what a build would make before making it: its ``state_dict()`` has the real
    build's keys and shapes. With ``max_tensors``, a builder that registers more than that many
    parameters and buffers (or more than ``8 * max_tensors + 256`` submodules) is stopped with a
    :class:`UserError`. Builder errors propagate as they are.
    """
    what = f"model {name} with these options"
    budget = _registration_budget(max_tensors, 8 * max_tensors + 256, what) if max_tensors is not None else None
    with _LargeOnMeta(SKELETON_REAL_ELEMENTS):
        if budget is None:
            return build_model(name, num_classes, input_shape, **options)
        with budget:
            return build_model(name, num_classes, input_shape, **options)


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


# ---------------------------------------------------------------------------------- Vision Transformer
@register_model("vit_tiny")
def vit_tiny(num_classes: int, input_shape: tuple[int, ...], patch: int = 7, dim: int = 64, depth: int = 4,
             heads: int = 4, mlp: int = 128, dropout: float = 0.0) -> nn.Module:
    """Small ViT (:class:`probmask.app.vit.ViTTiny`): patch 7 on 28x28, width 64, 4 blocks of 4 heads."""
    from probmask.app.vit import ViTTiny

    return ViTTiny(num_classes, input_shape, patch=patch, dim=dim, depth=depth, heads=heads, mlp=mlp, dropout=dropout)
