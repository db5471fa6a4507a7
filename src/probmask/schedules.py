"""Per-epoch schedules: the keep-ratio budget and the inverse temperature.

Both are small frozen dataclasses called as ``schedule(epoch, num_epochs)``; ``epoch`` may be
fractional (for per-step updates). Defaults are the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CubicBudget", "TemperatureSchedule"]


def _check_epoch(epoch: float, num_epochs: float) -> None:
    if num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive, got {num_epochs}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")


@dataclass(frozen=True)
class CubicBudget:
    """Keep ratio k/n: 1 before ``start*E``, cubic decay to ``target`` at ``end*E``, then flat.

    r(e) = target + (1 - target) * (1 - (e - ts) / (te - ts))^3 for ts <= e <= te.
    """

    target: float  # final keep ratio, 1 - sparsity
    start: float = 0.16  # ts as a fraction of the epochs
    end: float = 0.6  # te as a fraction of the epochs

    def __post_init__(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target keep ratio must lie in (0, 1], got {self.target}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(
                f"need 0 <= start <= end <= 1 (fractions of the epochs), got {self.start}, {self.end}"
            )

    def __call__(self, epoch: float, num_epochs: float) -> float:
        _check_epoch(epoch, num_epochs)
        ts, te = self.start * num_epochs, self.end * num_epochs
        if epoch < ts:
            return 1.0
        if epoch >= te:
            return self.target
        frac = (epoch - ts) / (te - ts)
        return self.target + (1.0 - self.target) * (1.0 - frac) ** 3


@dataclass(frozen=True)
class TemperatureSchedule:
    """Inverse temperature T(e) = 1 / ((1 - final) * (1 - e/E) + final): 1 at e=0, 1/final at e=E."""

    final: float = 0.03

    def __post_init__(self) -> None:
        if not 0.0 < self.final <= 1.0:
            raise ValueError(f"final temperature must lie in (0, 1], got {self.final}")

    def __call__(self, epoch: float, num_epochs: float) -> float:
        _check_epoch(epoch, num_epochs)
        progress = min(epoch / num_epochs, 1.0)
        return 1.0 / ((1.0 - self.final) * (1.0 - progress) + self.final)
