"""The object users hold: ``ProbMask(model, sparsity)``.

It selects the prunable weights, owns their keep-probabilities (one flat float32 tensor with a
view per layer), attaches a mask parametrization to each weight, follows the budget and
temperature schedules, projects after every optimizer step, fixes the mask with an exact budget
and finalizes the model back into a plain ``nn.Module``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from probmask.fixing import sample_mask, topk_mask
from probmask.kernels import cpu as native
from probmask.masks import (
    MaskMode,
    MaskParametrization,
    relaxed_masked_weight,
    relaxed_masked_weights,
)
from probmask.projection import project_
from probmask.report import LayerReport, Report
from probmask.schedules import CubicBudget, TemperatureSchedule
from probmask.selection import DEFAULT_MODULE_TYPES, Target, select_targets

__all__ = ["FloorSpec", "ProbMask", "accumulate_samples", "resolve_floors"]

log = logging.getLogger(__name__)

FloorSpec = str | int | float | None
_STATE_VERSION = 1


def accumulate_samples(loss_fn: Callable[[], Tensor], num_samples: int) -> Tensor:
    """Average a loss over ``num_samples`` mask samples: one forward/backward each, loss / K.

    ``loss_fn`` runs one forward pass (which draws a fresh mask) and returns the loss; gradients
    accumulate in ``.grad``. Returns the mean loss, detached.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    total: Tensor | None = None
    for _ in range(num_samples):
        loss = loss_fn() / num_samples
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()  # stays on device
    assert total is not None
    return total



def resolve_floors(floor: FloorSpec, rows: Sequence[int], sizes: Sequence[int], target_kept: int,
                   sparsity: float) -> list[int]:
    """Per-layer minimum kept counts for a ``floor`` setting (see :class:`ProbMask`); ``rows`` are
    the layers' output units, ``sizes`` their weight counts. Shared with the baseline methods."""
    if floor is None or floor == 0:
        floors = [0] * len(sizes)
    elif floor == "auto":
        scale = min(1.0, 0.5 * target_kept / sum(rows))
        floors = [max(1, int(r * scale)) for r in rows]
    elif floor == "unit":
        floors = list(rows)
    elif isinstance(floor, bool):
        raise ValueError("floor must be 'auto', 'unit', an int, a float in (0, 1) or None")
    elif isinstance(floor, int) and floor > 0:
        floors = [floor] * len(sizes)
    elif isinstance(floor, float) and 0.0 < floor < 1.0:
        floors = [max(1, math.ceil(floor * n)) for n in sizes]
    else:
        raise ValueError(
            f"floor must be 'auto', 'unit', a positive int, a float in (0, 1) or None; got {floor!r}"
        )
    floors = [min(f, n) for f, n in zip(floors, sizes)]
    if sum(floors) > target_kept:
        raise ValueError(
            f"the per-layer floors keep {sum(floors)} weights but the budget at sparsity "
            f"{sparsity} is {target_kept}: set the floor to 'auto', a smaller value or None "
            "(ProbMask(floor=...); prune.floor in a run config)"
        )
    return floors


class ProbMask:
    """Probabilistic masking of a model's weights under one global sparsity budget.

    Args:
        model: any ``nn.Module``; its prunable weights get a mask parametrization in place.
        sparsity: the fraction of prunable weights removed at the end, in (0, 1).
        module_types: module classes whose ``weight`` is prunable (default: Linear, Conv*, ConvTranspose*).
        include: extra parameter-name patterns to prune (``"*.in_proj_weight"``, ``"lstm.weight_*"``).
        exclude: parameter-name patterns to keep dense (``"conv1.weight"``, ``"fc.weight"``).
        floor: per-layer minimum of kept weights: ``"auto"`` (default: one per output unit, scaled
            down proportionally if that would take more than half of the budget, never below 1),
            ``"unit"`` (one per output unit, strictly), an ``int`` count, a ``float`` fraction of
            each layer, or ``None`` for no floor.
        freeze_weights: supermask mode: prunable weights stay at their initial values.
        score_init: initial keep-probability. At exactly 1 a score still gets a (small) gradient,
            because the relaxation's derivative is computed in a form that does not round to 0.
        budget: keep-ratio schedule (default: the paper's cubic schedule to ``1 - sparsity``).
        temperature: inverse-temperature schedule (default: the paper's, 1 -> 33).
        check_finite: raise on NaN/inf weights at projection time (one extra reduction per step).
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float,
        *,
        module_types: Sequence[type[nn.Module]] = DEFAULT_MODULE_TYPES,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        floor: FloorSpec = "auto",
        freeze_weights: bool = False,
        score_init: float = 1.0,
        budget: CubicBudget | None = None,
        temperature: TemperatureSchedule | None = None,
        check_finite: bool = True,
    ) -> None:
        if not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
            raise ValueError(
                f"sparsity is the fraction of weights removed and must lie in (0, 1), got "
                f"{sparsity!r} (e.g. 0.99 keeps 1%)"
            )
        if not 0.0 <= score_init <= 1.0:
            raise ValueError(f"score_init is a probability and must lie in [0, 1], got {score_init}")
        if any(parametrize.is_parametrized(m) for m in model.modules()):
            raise ValueError(
                "the model already has parametrizations (is it wrapped by another ProbMask?); "
                "finalize or remove them first"
            )
        self.model = model
        self.sparsity = float(sparsity)
        self.targets: list[Target] = select_targets(model, module_types, include, exclude)
        self._modules = [model.get_submodule(t.module_name) for t in self.targets]
        params = [getattr(m, t.param_name) for m, t in zip(self._modules, self.targets)]
        self.shapes = [tuple(p.shape) for p in params]
        self.sizes = [p.numel() for p in params]
        self.total = sum(self.sizes)
        self._offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        # at most (1 - sparsity) * n, without losing one to rounding (0.1 * 266200 = 26619.999...)
        self.target_kept = int(math.floor((1.0 - self.sparsity) * self.total + 1e-6))
        if self.target_kept < 1:
            raise ValueError(
                f"sparsity {self.sparsity} of {self.total} prunable weights keeps none; lower it"
            )
        self.floors = self._resolve_floors(floor, params)
        self.budget_schedule = budget or CubicBudget(1.0 - self.sparsity)
        self.temperature_schedule = temperature or TemperatureSchedule()
        self.freeze_weights = freeze_weights
        self.check_finite = check_finite

        device = params[0].device
        self.scores = torch.full((self.total,), float(score_init), device=device, requires_grad=True)
        self._buffer: Tensor | None = None  # scratch for masks and projection, see _workspace
        self._threshold = 0.0  # last projection's shift: warm start for the next
        self._floor_binding = torch.zeros(len(self.sizes), dtype=torch.bool)
        self._fixed: Tensor | None = None
        self._forced_mode: MaskMode | None = None
        self._views: tuple[Tensor, ...] | None = None  # score views for the current forward pass
        self._cache: dict[int, Tensor] = {}
        self._finalized = False
        self.epoch = 0.0
        self.num_epochs = 1.0
        self.budget = float(self.total)  # kept-weight budget for the current epoch
        self.temperature = 1.0
        self._requires_grad = [p.requires_grad for p in params]
        self._param_order = [list(m._parameters) for m in self._modules]  # restored by finalize

        for index, (module, target) in enumerate(zip(self._modules, self.targets)):
            parametrize.register_parametrization(
                module, target.param_name, MaskParametrization(self, index), unsafe=True
            )
            if freeze_weights:
                self._original(index).requires_grad_(False)
        self._hooks = [
            model.register_forward_pre_hook(self._begin_forward),
            model.register_forward_hook(self._end_forward, always_call=True),
        ]
        log.info(
            "ProbMask: %d prunable tensors, %d weights, keeping %d (sparsity %.4f)",
            len(self.sizes), self.total, self.target_kept, self.sparsity,
        )

    # ------------------------------------------------------------------ set-up helpers
    def _resolve_floors(self, floor: FloorSpec, params: Sequence[Tensor]) -> list[int]:
        rows = [p.shape[0] if p.dim() > 0 else 1 for p in params]
        return resolve_floors(floor, rows, self.sizes, self.target_kept, self.sparsity)

    def _original(self, index: int) -> nn.Parameter:
        module, target = self._modules[index], self.targets[index]
        return module.parametrizations[target.param_name].original  # type: ignore[index]

    # ------------------------------------------------------------------ modes and masks
    @property
    def mode(self) -> MaskMode:
        """FIXED after fix_mask; otherwise RELAXED in model.train() and SAMPLED in model.eval()."""
        if self._forced_mode is not None:
            return self._forced_mode
        if self._fixed is not None:
            return MaskMode.FIXED
        return MaskMode.RELAXED if self.model.training else MaskMode.SAMPLED

    @contextlib.contextmanager
    def use_mode(self, mode: MaskMode) -> Iterator[None]:
        """Temporarily force a mask mode (e.g. SAMPLED masks while the model is in train mode)."""
        if mode is MaskMode.FIXED and self._fixed is None:
            raise ValueError("no fixed mask yet: call fix_mask() first")
        previous, self._forced_mode = self._forced_mode, mode
        try:
            yield
        finally:
            self._forced_mode = previous

    def _begin_forward(self, module: nn.Module, args: Any) -> None:
        if self.scores.device != self._original(0).device:
            raise RuntimeError(
                f"the scores are on {self.scores.device} but the weights on "
                f"{self._original(0).device}: move the model before creating ProbMask"
            )
        self._cache.clear()
        self._views = self._score_views()
        if self.mode is MaskMode.RELAXED:  # sample every layer's mask now, in a few flat passes
            weights = [self._original(i) for i in range(len(self.sizes))]
            work = None if native.supports(self.scores, *weights) else self._workspace()  # the kernels need none
            outs = relaxed_masked_weights(self.scores, weights, self.temperature, work)
            self._cache.update(enumerate(outs))

    def _workspace(self) -> Tensor:
        """One kept scratch tensor shaped like the scores, for the masks' and the projection's
        full-size temporaries (they never run at the same time) when they run as PyTorch
        operations; the compiled kernels need none (see :mod:`probmask.kernels.cpu`)."""
        if self._buffer is None or self._buffer.device != self.scores.device:
            self._buffer = torch.empty_like(self.scores, requires_grad=False)
        return self._buffer

    def _end_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._cache.clear()  # the autograd graph keeps what backward needs
        self._views = None

    def _score_views(self) -> tuple[Tensor, ...]:
        return tuple(s.view(shape) for s, shape in zip(self.scores.split(self.sizes), self.shapes))

    def _masked_weight(self, index: int, weight: Tensor) -> Tensor:
        """Called by the parametrization on every read of a prunable weight."""
        cached = self._cache.get(index)
        if cached is not None:  # one mask sample per forward pass, however often it is read
            return cached
        views = self._views if self._views is not None else self._score_views()
        score = views[index]
        mode = self.mode
        if mode is MaskMode.RELAXED:
            out = relaxed_masked_weight(weight, score, self.temperature)  # read outside model.forward
        elif mode is MaskMode.SAMPLED:
            keep = torch.rand_like(score, dtype=torch.float32).lt_(score.detach())  # 1.0 / 0.0
            out = keep.mul_(weight) if keep.dtype == weight.dtype else weight * keep.to(weight.dtype)
        else:
            assert self._fixed is not None
            out = weight * self._fixed_view(index).to(weight.dtype)
        if self._views is not None:
            self._cache[index] = out
        return out

    def _fixed_view(self, index: int) -> Tensor:
        assert self._fixed is not None
        start = self._offsets[index]
        return self._fixed[start : start + self.sizes[index]].view(self.shapes[index])

    # ------------------------------------------------------------------ training API
    def weight_parameters(self) -> list[nn.Parameter]:
        """The model's trainable parameters (prunable weights unless frozen, biases, norms)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def score_parameters(self) -> list[Tensor]:
        """The keep-probabilities: one flat tensor (train it with Adam, no weight decay)."""
        return [self.scores]

    def set_epoch(self, epoch: float, num_epochs: float) -> None:
        """Move the budget and temperature schedules to ``epoch`` of ``num_epochs``."""
        self.epoch, self.num_epochs = float(epoch), float(num_epochs)
        keep = self.budget_schedule(self.epoch, self.num_epochs)
        self.budget = max(keep * self.total, float(self.target_kept))
        self.temperature = self.temperature_schedule(self.epoch, self.num_epochs)

    @torch.no_grad()
    def project(self) -> None:
        """Project all scores onto {0 <= s <= 1, sum s <= budget, layer sums >= floors}.

        Call after every optimizer step of the scores. Does nothing once the mask is fixed.
        """
        self._require_live()
        if self._fixed is not None:
            return
        if self.check_finite:
            totals = torch.stack([self._original(i).detach().float().sum() for i in range(len(self.sizes))])
            if not bool(torch.isfinite(totals).all()):
                bad = [self.targets[i].name for i in range(len(self.sizes)) if not torch.isfinite(totals[i])]
                raise ValueError(
                    f"NaN or inf in the weights {bad[:4]}: lower the learning rate or clip gradients"
                )
        floors = self.floors if any(self.floors) else None
        result = project_(
            self.scores, self.budget, sizes=self.sizes, floors=floors,
            start=self._threshold, buffer=None if native.supports(self.scores) else self._workspace(),
        )
        self._threshold = result.threshold
        self._floor_binding = result.floor_binding

    # ------------------------------------------------------------------ fixing and finalizing
    @torch.no_grad()
    def fix_mask(
        self,
        method: str = "topk",
        *,
        num_samples: int = 10,
        score_fn: Callable[[], float] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Fix one binary mask with at most ``target_kept`` ones and every floor honoured.

        ``"topk"`` keeps the highest scores (exactly ``target_kept``). ``"sample"`` draws
        ``num_samples`` Bernoulli masks, repairs each to the budget (see :mod:`probmask.fixing`)
        and keeps the one for which ``score_fn()`` (run with that mask in place) is highest.
        The scores stop training afterwards. Returns the flat bool mask.
        """
        self._require_live()
        scores = self.scores.detach()
        args = (self.target_kept, self.sizes, self.floors)
        if method == "topk":
            mask = topk_mask(scores, *args)
        elif method == "sample":
            if num_samples < 1:
                raise ValueError(f"num_samples must be >= 1, got {num_samples}")
            if num_samples > 1 and score_fn is None:
                raise ValueError("fix_mask('sample', num_samples > 1) needs score_fn to pick the best")
            best, best_value = None, -math.inf
            for i in range(num_samples):
                candidate = sample_mask(scores, *args, generator=generator)
                if score_fn is None:
                    best = candidate
                    break
                self._fixed = candidate
                value = float(score_fn())
                log.info("fix_mask: sample %d/%d scored %.4f", i + 1, num_samples, value)
                if value > best_value:
                    best, best_value = candidate, value
            assert best is not None
            mask = best
        else:
            raise ValueError(f"unknown fix_mask method {method!r}: use 'topk' or 'sample'")
        self._fixed = mask
        self.scores.requires_grad_(False)
        kept = [int(m.sum()) for m in mask.split(self.sizes)]
        self._floor_binding = torch.tensor([k <= f for k, f in zip(kept, self.floors)])
        return mask

    @property
    def fixed_mask(self) -> Tensor | None:
        """The flat bool mask after fix_mask, else None."""
        return self._fixed

    def masks(self) -> dict[str, Tensor]:
        """The fixed mask per parameter name (bool tensors shaped like the weights)."""
        if self._fixed is None:
            raise ValueError("no fixed mask yet: call fix_mask() first")
        return {t.name: self._fixed_view(i).clone() for i, t in enumerate(self.targets)}

    @torch.no_grad()
    def finalize(self) -> nn.Module:
        """Bake the fixed mask into the weights and remove every trace of ProbMask.

        Returns the same model object, now a plain module of its original class whose
        ``state_dict`` has the original keys and zeros where weights were pruned.
        """
        self._require_live()
        if self._fixed is None:
            raise ValueError("finalize() needs a fixed mask: call fix_mask() first")
        with self.use_mode(MaskMode.FIXED):
            for index, (module, target) in enumerate(zip(self._modules, self.targets)):
                parametrize.remove_parametrizations(module, target.param_name, leave_parametrized=True)
                getattr(module, target.param_name).requires_grad_(self._requires_grad[index])
        for module, order in zip(self._modules, self._param_order):
            # removal re-adds the parameter last; keep the original state_dict key order
            module._parameters = {name: module._parameters[name] for name in order}
        for handle in self._hooks:
            handle.remove()
        self._finalized = True
        return self.model

    def _require_live(self) -> None:
        if self._finalized:
            raise RuntimeError("this ProbMask was finalized; its model is a plain module now")

    # ------------------------------------------------------------------ reporting and state
    def report(self) -> Report:
        """Per-layer shape, size, kept count (exact once fixed), density and floors."""
        if self._fixed is not None:
            kept: list[float] = [float(m.sum()) for m in self._fixed.split(self.sizes)]
        else:
            kept = [float(s.sum()) for s in self.scores.detach().clamp(0, 1).split(self.sizes)]
        layers = [
            LayerReport(t.name, shape, size, k, fl, bool(b))
            for t, shape, size, k, fl, b in zip(
                self.targets, self.shapes, self.sizes, kept, self.floors, self._floor_binding.tolist()
            )
        ]
        return Report(layers, fixed=self._fixed is not None, target_kept=self.target_kept)

    def state_dict(self) -> dict[str, Any]:
        """Scores, schedule position and fixed mask: everything needed to resume."""
        return {
            "version": _STATE_VERSION,
            "names": [t.name for t in self.targets],
            "shapes": [list(s) for s in self.shapes],
            "sparsity": self.sparsity,
            "scores": self.scores.detach().clone(),
            "threshold": self._threshold,
            "epoch": self.epoch,
            "num_epochs": self.num_epochs,
            "fixed_mask": None if self._fixed is None else self._fixed.clone(),
            "floor_binding": self._floor_binding.clone(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`; refuses a state of a different model."""
        self._require_live()
        names = [t.name for t in self.targets]
        if state.get("names") != names or [list(s) for s in self.shapes] != state.get("shapes"):
            raise ValueError(
                "this ProbMask state belongs to a different model (its prunable layers are "
                f"{state.get('names')!r}, this model's are {names!r}); load it into the model it "
                "was saved from"
            )
        if float(state["sparsity"]) != self.sparsity:
            raise ValueError(
                f"the state was saved at sparsity {state['sparsity']}, this ProbMask uses "
                f"{self.sparsity}: create it with the same sparsity"
            )
        self.scores.copy_(state["scores"])
        self._threshold = float(state["threshold"])
        self.set_epoch(float(state["epoch"]), float(state["num_epochs"]))
        fixed = state.get("fixed_mask")
        self._fixed = None if fixed is None else fixed.to(self.scores.device, torch.bool).clone()
        self.scores.requires_grad_(self._fixed is None)
        if "floor_binding" in state:
            self._floor_binding = state["floor_binding"].clone()
