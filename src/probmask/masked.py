"""The base of every masking method: :class:`MaskedModel`.

It prepares a model (selects the prunable weights, lays their mask elements out in one flat
vector, attaches a ``weight -> weight * mask`` parametrization to each), owns the global budget
(the exact target count and the per-layer floors), and at the end fixes the mask, bakes it into
the weights and removes every trace of itself ("squash"). A method subclasses it and says only
how its mask is chosen and when:

* :meth:`MaskedModel._masked_weight`: what a read of a prunable weight returns (default: the
  weight times the current hard mask ``self.mask``);
* :meth:`MaskedModel.step`: what happens after every optimizer step (a projection, a new
  magnitude mask, ...);
* :meth:`MaskedModel._final_mask`: the fixed mask at the end of the main phase.

One mask element may stand for a group of weights (see :mod:`probmask.granularity`); counts,
floors and reports are in mask elements. The granularity also sets the budget: an
:class:`probmask.NM` granularity fixes the sparsity at ``1 - N/M`` and has no floors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from probmask.budget import FloorSpec
from probmask.granularity import ELEMENT, Granularity, Layout
from probmask.report import LayerReport, Report
from probmask.selection import DEFAULT_MODULE_TYPES, Target, select_targets

__all__ = ["MaskParametrization", "MaskedModel"]

log = logging.getLogger(__name__)

_STATE_VERSION = 2


class MaskParametrization(nn.Module):
    """The parametrization registered on each prunable weight: ``weight -> masked weight``.

    It holds no tensors of its own: it asks its owner for the masked weight of its layer, so
    that all masks and scores live in flat vectors. The owner is kept out of the module tree.
    """

    def __init__(self, owner: MaskedModel, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule, not in state_dict
        self.index = index

    def forward(self, weight: Tensor) -> Tensor:
        return self._owner._masked_weight(self.index, weight)

    def extra_repr(self) -> str:
        return f"layer={self.index}"


class MaskedModel:
    """Masks on a model's prunable weights under one global budget (see the module docstring).

    Args:
        model: any ``nn.Module``; its prunable weights get a mask parametrization in place.
        sparsity: the fraction of mask elements removed at the end, in (0, 1); implied by an N:M
            granularity (leave it None there), required otherwise.
        module_types: module classes whose ``weight`` is prunable (default: Linear, Conv*, ConvTranspose*).
        include: extra parameter-name patterns to prune (``"*.in_proj_weight"``, ``"lstm.weight_*"``).
        exclude: parameter-name patterns to keep dense (``"conv1.weight"``, ``"fc.weight"``).
        floor: per-layer minimum of kept elements (see :func:`probmask.budget.resolve_floors`).
        freeze_weights: supermask mode: no parameter of the model trains (the prunable weights keep
            their initial values); only a method's own scores do.
        granularity: what one mask element stands for (default: one weight) and which budget
            counts them (:class:`probmask.NM`: N of every M consecutive input weights).
    """

    learns_group_budgets: ClassVar[bool] = False  # a method that honours a per-group budget (N:M)

    def __init__(
        self,
        model: nn.Module,
        sparsity: float | None = None,
        *,
        module_types: Sequence[type[nn.Module]] = DEFAULT_MODULE_TYPES,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        floor: FloorSpec = "auto",
        freeze_weights: bool = False,
        granularity: Granularity = ELEMENT,
    ) -> None:
        if granularity.per_group_budget and not self.learns_group_budgets:
            raise ValueError(
                f"{type(self).__name__} fixes one global mask and cannot keep a budget per group "
                f"({granularity.name}); learn it with ProbMask(model, granularity=...)"
            )
        self.sparsity = granularity.resolve_sparsity(sparsity)
        if any(parametrize.is_parametrized(m) for m in model.modules()):
            raise ValueError(
                "the model already has parametrizations (is it wrapped by another ProbMask or method?); "
                "finalize or remove them first"
            )
        self.model = model
        self.targets: list[Target] = select_targets(model, module_types, include, exclude)
        self._modules = [model.get_submodule(t.module_name) for t in self.targets]
        params = [getattr(m, t.param_name) for m, t in zip(self._modules, self.targets)]
        names, shapes = [t.name for t in self.targets], [tuple(p.shape) for p in params]
        granularity.check(names, shapes, self._modules)
        self.layout = Layout.of(names, shapes, granularity)
        self.total = self.layout.total
        self.target_kept = granularity.kept(self.sparsity, self.total)
        if self.target_kept < 1:
            raise ValueError(f"sparsity {self.sparsity} of {self.total} prunable weights keeps none; lower it")
        self.floors = granularity.floors(floor, self.layout, self.target_kept, self.sparsity)
        self.freeze_weights = bool(freeze_weights)
        self.device = params[0].device
        self.mask: Tensor | None = self._initial_mask()  # the current hard mask
        self.epoch, self.num_epochs = 0.0, 1.0
        self._fixed = False
        self._finalized = False
        self._hooks: list[RemovableHandle] = []
        self._requires_grad = {id(p): p.requires_grad for p in model.parameters()}  # restored by finalize
        self._param_order = [list(m._parameters) for m in self._modules]  # restored by finalize
        for index, (module, target) in enumerate(zip(self._modules, self.targets)):
            parametrize.register_parametrization(module, target.param_name, MaskParametrization(self, index),
                                                 unsafe=True)
        if self.freeze_weights:
            for p in model.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------ what a method decides
    def _masked_weight(self, index: int, weight: Tensor) -> Tensor:
        """Called by the parametrization on every read of prunable weight ``index``."""
        assert self.mask is not None
        return self.layout.granularity.apply(weight, self.layout.view(self.mask, index))

    def _initial_mask(self) -> Tensor | None:
        """The hard mask before training: everything kept (None: the method has none until fixed)."""
        return torch.ones(self.total, dtype=torch.bool, device=self.device)

    def _final_mask(self, score_fn: Callable[[], float] | None, generator: torch.Generator | None) -> Tensor:
        """The flat bool mask fixed at the end of the main phase (at most ``target_kept`` ones,
        every floor honoured). ``score_fn()`` scores the mask in place (higher is better)."""
        raise NotImplementedError

    def _kept(self) -> list[float]:
        """Kept elements per layer now: exact for a hard mask, expected for probabilities."""
        assert self.mask is not None
        return [float(m.sum()) for m in self.mask.split(self.layout.sizes)]

    # ------------------------------------------------------------------ training
    def weight_parameters(self) -> list[nn.Parameter]:
        """The model's trainable parameters (none in supermask mode)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def score_parameters(self) -> list[Tensor]:
        """A method's own trainable tensors (trained by Adam without weight decay); none by default."""
        return []

    @property
    def finetunes(self) -> bool:
        """Whether the weights are finetuned once the mask is fixed (not in supermask mode)."""
        return not self.freeze_weights

    def set_epoch(self, epoch: float, num_epochs: float) -> None:
        """Move the method's schedules to ``epoch`` (may be fractional) of ``num_epochs``."""
        self.epoch, self.num_epochs = float(epoch), float(num_epochs)

    def passes(self, samples: int) -> int:
        """Forward/backward passes per minibatch when ``samples`` mask samples are asked for."""
        return 1

    def step(self) -> None:  # noqa: B027 - a hook methods may use
        """Call after every optimizer step."""

    def stats(self) -> dict[str, float]:
        """Figures worth logging per epoch: ``density`` (kept fraction; expected before fixing)."""
        return {"density": sum(self._kept()) / self.total}

    # ------------------------------------------------------------------ fixing and finalizing
    @torch.no_grad()
    def fix_mask(self, *, score_fn: Callable[[], float] | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Fix the final binary mask (see :meth:`_final_mask`); trainable scores stop training.
        Returns the flat bool mask."""
        self._require_live()
        return self._fix(self._final_mask(score_fn, generator))

    def _fix(self, mask: Tensor) -> Tensor:
        """Make ``mask`` the fixed mask after checking it against the budget."""
        mask = mask.to(torch.bool)
        kept = int(mask.sum())
        if mask.shape != (self.total,) or kept > self.target_kept:
            raise RuntimeError(f"{type(self).__name__} fixed {kept} elements for a budget of {self.target_kept}")
        self.mask = mask
        self._fixed = True
        for s in self.score_parameters():
            s.requires_grad_(False)
        return mask

    @property
    def fixed_mask(self) -> Tensor | None:
        """The flat bool mask once fixed, else None."""
        return self.mask if self._fixed else None

    def masks(self) -> dict[str, Tensor]:
        """The fixed mask per parameter name, as bool tensors shaped like the weights."""
        if not self._fixed or self.mask is None:
            raise ValueError("no fixed mask yet: call fix_mask() first")
        return {t.name: self.layout.expand(self.mask, i).clone() for i, t in enumerate(self.targets)}

    @torch.no_grad()
    def finalize(self) -> nn.Module:
        """Bake the fixed mask into the weights and remove every trace of the method.

        Returns the same model object, now a plain module of its original class whose
        ``state_dict`` has the original keys in their order and zeros where weights were pruned;
        every parameter's ``requires_grad`` is as it was before.
        """
        self._require_live()
        if not self._fixed:
            raise ValueError("finalize() needs a fixed mask: call fix_mask() first")
        for module, target in zip(self._modules, self.targets):
            parametrize.remove_parametrizations(module, target.param_name, leave_parametrized=True)
        for module, order in zip(self._modules, self._param_order):
            # removal re-adds the parameter last; keep the original state_dict key order
            module._parameters = {name: module._parameters[name] for name in order}
        for p in self.model.parameters():
            p.requires_grad_(self._requires_grad.get(id(p), p.requires_grad))
        for handle in self._hooks:
            handle.remove()
        self._finalized = True
        return self.model

    def _require_live(self) -> None:
        if self._finalized:
            raise RuntimeError(f"this {type(self).__name__} was finalized; its model is a plain module now")

    # ------------------------------------------------------------------ reporting and state
    def _floor_binding(self, kept: list[float]) -> list[bool]:
        return [fl > 0 and k <= fl for k, fl in zip(kept, self.floors)]

    def report(self) -> Report:
        """Per-layer shape, size, kept count (exact once fixed) and floors, in mask elements."""
        kept = self._kept()
        layers = [
            LayerReport(name, shape, size, k, fl, bool(b))
            for name, shape, size, k, fl, b in zip(
                self.layout.names, self.layout.mask_shapes, self.layout.sizes, kept, self.floors,
                self._floor_binding(kept),
            )
        ]
        return Report(layers, fixed=self._fixed, target_kept=self.target_kept)

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the model's own parameters needed to resume: tensors and plain values."""
        return {
            "version": _STATE_VERSION,
            "method": type(self).__name__,
            "names": list(self.layout.names),
            "shapes": [list(s) for s in self.layout.mask_shapes],
            "sparsity": self.sparsity,
            "granularity": self.layout.granularity.name,
            "mask": None if self.mask is None else self.mask.clone(),
            "fixed": self._fixed,
            "epoch": self.epoch,
            "num_epochs": self.num_epochs,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; refuses a state of another model or method."""
        self._require_live()
        names, shapes = list(self.layout.names), [list(s) for s in self.layout.mask_shapes]
        if state.get("method") != type(self).__name__ or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"this state was saved by {state.get('method')!r} (version {state.get('version')}), "
                f"not by {type(self).__name__} (version {_STATE_VERSION})"
            )
        if state.get("names") != names or state.get("shapes") != shapes:
            theirs = dict(zip(state.get("names") or [], state.get("shapes") or []))
            differ = [f"{n}: {theirs.get(n)} saved, {s} here" for n, s in zip(names, shapes) if theirs.get(n) != s]
            extra = sorted(set(theirs) - set(names))
            raise ValueError(
                "this state belongs to a different model: "
                + "; ".join(differ[:4] + ([f"only in the state: {extra[:4]}"] if extra else []))
                + "; load it into the model it was saved from"
            )
        if float(state["sparsity"]) != self.sparsity:
            raise ValueError(
                f"the state was saved at sparsity {state['sparsity']}, this {type(self).__name__} uses "
                f"{self.sparsity}: create it with the same sparsity"
            )
        theirs = state.get("granularity", self.layout.granularity.name)
        if theirs != self.layout.granularity.name:
            raise ValueError(f"the state was saved with granularity {theirs!r}, this {type(self).__name__} uses "
                             f"{self.layout.granularity.name!r}: create it with the same granularity")
        mask = state["mask"]
        self.mask = None if mask is None else mask.to(device=self.device, dtype=torch.bool).clone()
        self._fixed = bool(state["fixed"])
        self.epoch, self.num_epochs = float(state["epoch"]), float(state["num_epochs"])
        for s in self.score_parameters():
            s.requires_grad_(not self._fixed)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self.targets)} prunable tensors, {self.total} elements, "
                f"keeping {self.target_kept}, fixed={self._fixed})")
