"""ProbMask for Hugging Face's ``transformers.Trainer``: one callback, an unchanged training script.

.. code-block:: python

    from probmask.integrations.transformers import ProbMaskCallback

    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[ProbMaskCallback(sparsity=0.9)])
    trainer.train()
    trainer.save_model()  # a plain model, 90% of its prunable weights zero

The callback puts the masks on the model when the ``Trainer`` is created, so that a checkpoint
written during training loads back into it. Its scores train with their own Adam optimizer,
stepped just before each of the trainer's optimizer steps and projected onto the budget right
after; the schedules follow ``state.global_step``; the mask is fixed at ``fix_at`` of the steps;
``on_train_end`` finalizes the model in place. With gradient accumulation the scores' gradients
accumulate like the weights'; with fp16 loss scaling they are unscaled, and a step whose
gradients overflow is skipped; under ``torchrun`` / ``accelerate launch`` they are averaged
across ranks.

Resuming (``trainer.train(resume_from_checkpoint=...)``) restores the scores, their optimizer,
the schedule position and a fixed mask from ``probmask_state.pt``, which the callback writes
into every ``checkpoint-N`` folder under ``output_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        'probmask.integrations.transformers needs the transformers package: pip install "probmask[transformers]"'
    ) from err

from probmask.atomic_io import atomic_write
from probmask.integrations.driver import StepDriver
from probmask.sparsifier import ProbMask

__all__ = ["STATE_FILE", "ProbMaskCallback"]

STATE_FILE = "probmask_state.pt"


class ProbMaskCallback(TrainerCallback):
    """Train a ProbMask mask with the ``Trainer``'s steps; the model ends finalized at ``sparsity``.

    Args: ``sparsity`` and the keyword options of :class:`~probmask.integrations.driver.StepDriver`
    (``fix_at=0.8``, ``score_lr=0.03``, ``budget_start``, ``budget_end``, ``score_init``,
    ``module_types``, ``include``, ``exclude``, ``floor``).
    """

    def __init__(self, sparsity: float, **options: Any) -> None:
        self.driver = StepDriver(sparsity, **options)
        self._attached_at_init = False

    @property
    def probmask(self) -> ProbMask:
        """The :class:`~probmask.ProbMask` on the model (once the ``Trainer`` has been created)."""
        if self.driver.probmask is None:
            raise RuntimeError("ProbMaskCallback is not attached yet: pass it to Trainer(callbacks=[...])")
        return self.driver.probmask

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.driver.attach(model)
            self._attached_at_init = True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.load_best_model_at_end:
            raise ValueError(
                "ProbMaskCallback does not support load_best_model_at_end=True: a best checkpoint from before "
                "the mask was fixed would not have the final sparsity; evaluate the finalized model instead"
            )
        if args.gradient_checkpointing or getattr(model, "is_gradient_checkpointing", False):
            raise ValueError(
                "ProbMaskCallback does not support gradient_checkpointing=True: the recomputed forward pass "
                "would draw other relaxed masks than the forward pass did; turn it off (TrainingArguments and "
                "model.gradient_checkpointing_disable())"
            )
        if state.global_step > 0:
            if not self._attached_at_init:
                raise ValueError(
                    "to resume, ProbMaskCallback must be passed to Trainer(callbacks=[...]) so that the masks "
                    "are on the model before the checkpoint's weights are loaded into it"
                )
            self.driver.load_state_dict(_read_state(Path(args.output_dir), state.global_step))
        elif not self.driver.attached:
            if model is None:
                raise ValueError("ProbMaskCallback got no model from the Trainer")
            self.driver.attach(model)
        self.driver.start(state.max_steps, state.global_step, "TrainerState.max_steps")

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.driver.optimizer_step(_loss_scale(optimizer))

    def on_step_end(self, args, state, control, **kwargs):
        self.driver.after_step(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:  # the main process writes, as the Trainer does
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            raise FileNotFoundError(f"the Trainer's checkpoint folder {folder} is missing; ProbMaskCallback "
                                    f"saves its state next to it")
        state_dict = self.driver.state_dict()
        atomic_write(folder / STATE_FILE, lambda tmp: torch.save(state_dict, tmp))

    def on_train_end(self, args, state, control, **kwargs):
        if self.driver.attached and not self.probmask._finalized:
            self.driver.finish()


def _loss_scale(optimizer: Any) -> float:
    """The current loss scale of the Trainer's fp16 grad scaler (accelerate keeps it on the optimizer), else 1."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return 1.0
    return float(scaler.get_scale())


def _read_state(output_dir: Path, step: int) -> dict[str, Any]:
    path = output_dir / f"checkpoint-{step}" / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"resuming at step {step}, but {path} does not exist; ProbMaskCallback keeps its state in the "
            f"Trainer's checkpoint-N folders under output_dir: resume from one of those with the same output_dir"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable ProbMask state ({err}); resume from another checkpoint") from err

