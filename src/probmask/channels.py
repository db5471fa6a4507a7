"""Coupled output channels, found by Torch-Pruning's dependency graph, and their physical removal.

Removing an output channel of a layer is only possible together with everything coupled to it:
the batch norm after it, the other convolutions added to it by a residual connection, the input
channels of the layers that read it. Torch-Pruning (``pip install "probmask[structured]"``)
traces the model once and knows these couplings; :class:`ChannelGraph` turns its groups into
something a mask can act on:

- a :class:`ChannelGroup` per set of coupled channels, with ``channels`` entries: entry ``c`` of
  the group is kept or removed as one;
- its ``outputs``: the parameters that produce the group's channels (weights and biases of the
  convolutions and linear layers, the affine weight and bias of normalization layers), each with
  the index, along dimension 0, that entry ``c`` has there.

:meth:`ChannelGraph.mask_` zeroes every output parameter of the removed entries. Each removed
channel is then exactly zero wherever it is read (a normalization layer with zero weight and bias
outputs zero), so removing it changes nothing: :meth:`ChannelGraph.shrink` removes the channels
(Torch-Pruning does the removal, input channels of the readers included) and the smaller model
computes what the masked one did, up to float rounding.

A layer whose output is the model's output is never a root: removing its channels would change
what the model returns. A layer in ``exclude`` is not pruned, nor anything coupled to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ChannelGraph", "ChannelGroup", "count_macs"]

_ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm,
                                            nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError as err:
        raise ImportError('channel groups need Torch-Pruning: pip install "probmask[structured]"') from err
    return torch_pruning


@dataclass(frozen=True)
class ChannelGroup:
    """Coupled output channels: entry ``c`` of every output parameter is kept or removed as one."""

    root: str  # the module whose output channels Torch-Pruning grouped the others around
    channels: int
    outputs: tuple[tuple[str, tuple[int, ...]], ...]  # (parameter name, its dim-0 index for each entry)

    @property
    def layers(self) -> list[str]:
        """The modules whose output channels are in this group."""
        return sorted({name.rsplit(".", 1)[0] for name, _ in self.outputs})


class ChannelGraph:
    """The coupled channel groups of ``model`` (traced once with ``example_inputs``).

    Args:
        model: the model; it is traced, not changed.
        example_inputs: a tensor or tuple of tensors the model accepts.
        exclude: module names whose channels stay (nothing coupled to them is pruned either).
        root_types: module classes whose output channels start a group.
    """

    def __init__(self, model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...], *,
                 exclude: Sequence[str] = (), root_types: Sequence[type[nn.Module]] = _ROOT_TYPES) -> None:
        tp = _torch_pruning()
        self.model = model
        self.example_inputs = example_inputs
        modules = dict(model.named_modules())
        unknown = [n for n in exclude if n not in modules]
        if unknown:
            raise ValueError(f"exclude names {unknown} are not modules of the model; module names look like "
                             f"{[n for n in modules if n][:5]}")
        ignored = [modules[n] for n in exclude] + _output_layers(model, example_inputs)
        was_training = model.training
        model.eval()
        try:
            self._graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
        finally:
            model.train(was_training)
        names = {module: name for name, module in modules.items()}
        self.groups: list[ChannelGroup] = []
        self._roots: list[tuple[nn.Module, Any]] = []
        for group in self._graph.get_all_groups(ignored_layers=ignored, root_module_types=list(root_types)):
            root = group[0].dep.target.module
            channels = len(group[0].idxs)
            outputs = []
            for dep, idxs in group:
                module = dep.target.module
                if module not in names or not any(True for _ in module.parameters(recurse=False)):
                    continue  # an operation (add, reshape, ...) or a parameter-free module
                if dep.handler.__name__ != "prune_out_channels" and not isinstance(module, _NORM_TYPES):
                    continue  # input channels of a reader: they see zeros once the outputs are masked
                outputs.extend(_output_members(names[module], module, idxs, channels))
            self.groups.append(ChannelGroup(names[root], channels, tuple(outputs)))
            self._roots.append((root, group[0].dep.handler))
        if not self.groups:
            raise ValueError("the model has no output channels that can be removed (are all its layers excluded "
                             "or feeding its output directly?)")

    @property
    def sizes(self) -> list[int]:
        """Entries per group: the length of each group's keep vector."""
        return [g.channels for g in self.groups]

    def _check_keep(self, keep: Sequence[Tensor]) -> list[Tensor]:
        if len(keep) != len(self.groups):
            raise ValueError(f"need one keep vector per channel group ({len(self.groups)}), got {len(keep)}")
        out = []
        for group, k in zip(self.groups, keep):
            k = torch.as_tensor(k, dtype=torch.bool).flatten().cpu()
            if k.numel() != group.channels:
                raise ValueError(f"the keep vector of the group of {group.root} needs {group.channels} entries, "
                                 f"got {k.numel()}")
            if not bool(k.any()):
                raise ValueError(f"the keep vector of the group of {group.root} keeps no channel; "
                                 f"keep at least one or exclude {group.layers}")
            out.append(k)
        return out

    @torch.no_grad()
    def mask_(self, keep: Sequence[Tensor]) -> None:
        """Zero, in place, every output parameter of the removed entries of each group."""
        params = dict(self.model.named_parameters())
        for group, k in zip(self.groups, self._check_keep(keep)):
            removed = (~k).nonzero().flatten().tolist()
            if not removed:
                continue
            for name, index in group.outputs:
                rows = torch.tensor([index[c] for c in removed], device=params[name].device)
                params[name].index_fill_(0, rows, 0.0)

    @torch.no_grad()
    def shrink(self, keep: Sequence[Tensor]) -> nn.Module:
        """Remove the channels ``keep`` drops, in place (Torch-Pruning); returns the model, now smaller."""
        checked = self._check_keep(keep)
        plans = [(root, handler, (~k).nonzero().flatten().tolist()) for (root, handler), k in zip(self._roots, checked)]
        for root, handler, removed in plans:
            if removed:
                self._graph.get_pruning_group(root, handler, idxs=removed).prune()
        return self.model


def _output_members(name: str, module: nn.Module, idxs: Sequence[Any], channels: int) -> list[tuple[str, tuple[int, ...]]]:
    """The parameters of ``module`` that produce the group's entries, with each entry's index."""
    index = tuple(int(getattr(i, "idx", i)) for i in idxs)
    if len(index) != channels or (isinstance(module, nn.modules.conv._ConvTransposeNd)):
        raise ValueError(
            f"layer {name!r} ({type(module).__name__}) is coupled to other channels in a way channel masks do not "
            f"handle; leave it dense with exclude=[{name!r}]"
        )
    if not isinstance(module, (*_ROOT_TYPES, *_NORM_TYPES)):
        raise ValueError(f"layer {name!r} ({type(module).__name__}) holds parameters of coupled channels that "
                         f"probmask cannot mask; leave it dense with exclude=[{name!r}]")
    members = []
    for param_name, param in module.named_parameters(recurse=False):
        if param.dim() >= 1 and param.shape[0] > max(index):
            members.append((f"{name}.{param_name}", index))
    return members


def _output_layers(model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...]) -> list[nn.Module]:
    """Modules whose output tensor is (part of) what the model returns."""
    outputs: list[tuple[Tensor, nn.Module]] = []  # held, so that no tensor's id is reused meanwhile

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            outputs.append((output, module))

    handles = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            result = model(*example_inputs) if isinstance(example_inputs, tuple) else model(example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    results = result if isinstance(result, (tuple, list)) else [result]
    found = [m for r in results if isinstance(r, Tensor) for t, m in outputs if t is r]
    return [m for m in found if next(m.children(), None) is None]  # a container would ignore all it holds


def count_macs(model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...]) -> tuple[int, int]:
    """Multiply-accumulates of the convolutions and linear layers in one forward pass on
    ``example_inputs`` (per example: divided by the batch size), and the parameter count.

    A convolution computes ``in_channels / groups * kernel elements`` products per output element,
    a linear layer ``in_features``; biases, normalization and activations are not counted.
    """
    total = 0

    def count(module: nn.Module, args: Any, output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            per_output = module.in_features
        else:
            per_output = module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod())
        total += output.numel() // output.shape[0] * per_output

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    handles = [m.register_forward_hook(count) for m in layers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*example_inputs) if isinstance(example_inputs, tuple) else model(example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total, sum(p.numel() for p in model.parameters())
