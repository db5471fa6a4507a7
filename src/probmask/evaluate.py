"""What a pruned model costs and how well it does: accuracy, sparsity, bytes and MACs.

MACs (multiply-accumulates) are counted with forward hooks on one real forward pass, per example:
``dense`` as if every weight were there, ``effective`` counting only nonzero weights (what a
sparse kernel has to do). Bias additions are not counted. For a layer producing ``P`` output
positions per example (``P = 1`` for a Linear on a vector, ``H_out * W_out`` for a Conv2d):

* Linear / Conv: dense = ``P * weight.numel()``, effective = ``P * nnz(weight)``
  (grouped convolutions included: their weight already has ``in_channels / groups`` columns);
* ConvTranspose: the same with ``P`` the number of *input* positions (each input element meets
  every weight once).

Zero padding is counted like any input, as the usual counters (fvcore, thop) do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from probmask.export import sparse_nbytes
from probmask.report import Report
from probmask.sparse import SparseConv2d, SparseLinear

__all__ = ["EvalReport", "LayerMacs", "MacReport", "accuracy", "count_macs", "evaluate"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class LayerMacs:
    name: str
    kind: str
    dense: int  # MACs per example with every weight present
    effective: int  # MACs per example by nonzero weights only

    @property
    def ratio(self) -> float:
        return self.effective / self.dense if self.dense else 0.0


@dataclass
class MacReport:
    layers: list[LayerMacs]

    @property
    def dense(self) -> int:
        return sum(layer.dense for layer in self.layers)

    @property
    def effective(self) -> int:
        return sum(layer.effective for layer in self.layers)


def _weight_counts(module: nn.Module) -> tuple[int, int]:
    """(numel, nonzeros) of a module's weight, dense or CSR."""
    if isinstance(module, SparseLinear):
        return module.in_features * module.out_features, module.nnz
    if isinstance(module, SparseConv2d):
        kh, kw = module.kernel_size
        return module.out_channels * module.in_channels * kh * kw, module.nnz
    weight = module.weight  # type: ignore[union-attr]
    return weight.numel(), int(torch.count_nonzero(weight.detach()))


@torch.no_grad()
def count_macs(model: nn.Module, example_input: Tensor) -> MacReport:
    """Dense and effective MACs per example of every Linear / Conv / ConvTranspose in ``model``.

    ``example_input`` is a batch (its first dimension is the batch size); a layer called more
    than once in a forward pass is counted once per call.
    """
    batch = int(example_input.shape[0]) if example_input.dim() > 0 else 1
    counts: dict[str, LayerMacs] = {}
    handles = []

    def hook(name: str, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        numel, nnz = _weight_counts(module)
        if isinstance(module, (nn.Linear, SparseLinear)):
            positions = output.numel() // module.out_features
        elif isinstance(module, _CONV):
            positions = output.numel() // module.out_channels
        elif isinstance(module, SparseConv2d):
            positions = output.numel() // module.out_channels
        else:  # transposed convolution: positions of the input
            positions = args[0].numel() // module.in_channels  # type: ignore[union-attr]
        entry = counts.setdefault(name, LayerMacs(name, type(module).__name__, 0, 0))
        entry.dense += positions * numel
        entry.effective += positions * nnz

    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, SparseLinear, SparseConv2d, *_CONV, *_CONV_T)):
            handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: hook(name, m, a, o)))
    was_training = model.training
    model.eval()
    try:
        model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    layers = [
        LayerMacs(e.name, e.kind, e.dense // batch, e.effective // batch) for e in counts.values()
    ]
    return MacReport(layers)


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy in percent over ``(inputs, targets)`` batches (model in eval mode)."""
    was_training = model.training
    model.eval()
    correct = seen = 0
    try:
        for x, y in batches:
            pred = model(x.to(device)).argmax(dim=1)
            correct += int((pred.cpu() == y).sum())
            seen += int(y.numel())
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("accuracy() got no examples")
    return 100.0 * correct / seen


@dataclass
class EvalReport:
    """Everything ``probmask eval`` prints; ``to_dict()`` is JSON-ready."""

    sparsity: float
    kept: int
    total: int
    dense_bytes: int
    sparse_bytes: int
    macs: MacReport
    test_accuracy: float | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)  # per pruned parameter: LayerReport.summary()

    def to_dict(self) -> dict[str, Any]:
        return {
            "test_accuracy": self.test_accuracy,
            "sparsity": self.sparsity,
            "kept": self.kept,
            "total": self.total,
            "dense_bytes": self.dense_bytes,
            "sparse_bytes": self.sparse_bytes,
            "dense_macs": self.macs.dense,
            "effective_macs": self.macs.effective,
            "mac_layers": [asdict(layer) for layer in self.macs.layers],
            "layers": self.layers,
        }

    def format(self) -> str:
        lines = []
        if self.test_accuracy is not None:
            lines.append(f"test accuracy     {self.test_accuracy:.2f}%")
        lines.append(f"sparsity          {self.sparsity:.4%}  ({self.kept:,} of {self.total:,} prunable weights kept)")
        ratio = self.dense_bytes / self.sparse_bytes if self.sparse_bytes else float("inf")
        lines.append(
            f"parameter bytes   dense {self.dense_bytes:,}  sparse {self.sparse_bytes:,}  ({ratio:.1f}x smaller)"
        )
        name_w = max([len("layer")] + [len(layer.name) for layer in self.macs.layers])
        head = f"{'layer':<{name_w}}  {'type':<15}  {'dense MACs':>14}  {'effective MACs':>14}  {'ratio':>7}"
        lines += ["", "MACs per example", head, "-" * len(head)]
        for layer in self.macs.layers:
            lines.append(
                f"{layer.name:<{name_w}}  {layer.kind:<15}  {layer.dense:>14,}  {layer.effective:>14,}  "
                f"{layer.ratio:>7.2%}"
            )
        lines.append("-" * len(head))
        total_ratio = self.macs.effective / self.macs.dense if self.macs.dense else 0.0
        lines.append(
            f"{'total':<{name_w}}  {'':<15}  {self.macs.dense:>14,}  {self.macs.effective:>14,}  {total_ratio:>7.2%}"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def evaluate(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    example_input: Tensor,
    batches: Iterable[tuple[Tensor, Tensor]] | None = None,
) -> EvalReport:
    """Sparsity and bytes from the masks, MACs from one forward pass, accuracy if ``batches``."""
    state = model.state_dict()
    unknown = [name for name in masks if name not in state]
    if unknown:
        raise ValueError(f"masks {unknown[:3]} name no tensor of the model")
    report = Report.count_nonzero(masks)
    kept, total = int(report.kept), report.total
    layers = [layer.summary() for layer in report.layers]
    dense_bytes = sum(t.numel() * t.element_size() for t in state.values())
    return EvalReport(
        sparsity=1.0 - kept / total if total else 0.0,
        kept=kept,
        total=total,
        dense_bytes=dense_bytes,
        sparse_bytes=sparse_nbytes(state, masks),
        macs=count_macs(model, example_input),
        test_accuracy=None if batches is None else accuracy(model, batches),
        layers=layers,
    )
