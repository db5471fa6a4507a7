"""ProbMask for ``lightning.Trainer``: one callback, an unchanged LightningModule.

.. code-block:: python

    from probmask.integrations.lightning import ProbMaskCallback

    trainer = lightning.Trainer(max_epochs=10, callbacks=[ProbMaskCallback(sparsity=0.9)])
    trainer.fit(module, train_loader)  # the module ends as a plain one, 90% of its prunable weights zero

The masks go on the LightningModule in ``setup`` (before a checkpoint is restored and before
``configure_optimizers``), after moving it to the trainer's device. The scores train with their
own Adam optimizer, stepped in ``on_before_optimizer_step`` (after Lightning's gradient
accumulation; unscaled under ``16-mixed``; averaged across ranks under DDP) and projected onto
the budget right after; the schedules follow ``trainer.global_step`` over
``trainer.estimated_stepping_batches``; the mask is fixed at ``fix_at`` of the steps;
``on_train_end`` finalizes the module in place. The callback's state (scores, their optimizer, a
fixed mask) is saved in Lightning's checkpoints, so ``trainer.fit(..., ckpt_path=...)`` resumes
where training stopped. Lightning's checkpoints hold no random number generator state, so until
the mask is fixed a resumed run draws other relaxed masks than an uninterrupted one would (a
module that seeds every batch resumes bit for bit), and resumed from the middle of an epoch, a
plain ``DataLoader`` starts again from its first batch.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning as L
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        'probmask.integrations.lightning needs the lightning package: pip install "probmask[lightning]"'
    ) from err

from probmask.integrations.driver import StepDriver
from probmask.sparsifier import ProbMask

__all__ = ["ProbMaskCallback"]


class ProbMaskCallback(L.Callback):
    """Train a ProbMask mask with the Lightning ``Trainer``'s steps; the module ends finalized at ``sparsity``.

    Args: ``sparsity`` and the keyword options of :class:`~probmask.integrations.driver.StepDriver`
    (``fix_at=0.8``, ``score_lr=0.03``, ``budget_start``, ``budget_end``, ``score_init``,
    ``module_types``, ``include``, ``exclude``, ``floor``).
    """

    def __init__(self, sparsity: float, **options: Any) -> None:
        self.driver = StepDriver(sparsity, **options)

    @property
    def probmask(self) -> ProbMask:
        """The :class:`~probmask.ProbMask` on the module (once ``fit`` has set it up)."""
        if self.driver.probmask is None:
            raise RuntimeError("ProbMaskCallback is not attached yet: it attaches when trainer.fit() starts")
        return self.driver.probmask

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "ProbMaskCallback needs automatic optimization (one optimizer step per training step); "
                "with manual optimization use probmask.integrations.driver.StepDriver in training_step"
            )
        # Lightning moves the module to its device only after setup, and the scores are created on
        # the weights' device: the module goes to the trainer's device first.
        pl_module.to(trainer.strategy.root_device)
        self.driver.attach(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.driver.start(trainer.estimated_stepping_batches, trainer.global_step,
                          "trainer.estimated_stepping_batches, from max_steps / max_epochs and the data's length")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self.driver.optimizer_step(scale)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.driver.after_step(trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.driver.attached and not self.probmask._finalized:
            self.driver.finish()

    def state_dict(self) -> dict[str, Any]:
        if not self.driver.attached or self.probmask._finalized:
            return {}
        return self.driver.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.driver.load_state_dict(state_dict)
