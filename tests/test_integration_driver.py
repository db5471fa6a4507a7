"""StepDriver: ProbMask driven one optimizer step at a time (the core of the training callbacks)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from probmask.integrations.driver import StepDriver, tied_weights


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _train(driver: StepDriver, model: nn.Module, steps: int, start: int = 0, scale: float = 1.0) -> None:
    weights = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(start)
    torch.manual_seed(start)  # the relaxed masks' noise
    for step in range(start, steps):
        x = torch.randn(32, 16, generator=gen)
        loss = nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long()) * scale
        loss.backward()
        driver.optimizer_step(scale)
        for p in model.parameters():  # what a loss scaler does for the trainer's own optimizer
            if p.grad is not None:
                p.grad.div_(scale)
        weights.step()
        weights.zero_grad()
        driver.after_step(step + 1)


def test_phases_follow_the_steps_and_the_end_is_exact():
    model = _mlp()
    driver = StepDriver(0.9, fix_at=0.5)
    pm = driver.attach(model)
    driver.start(20, 0, "test")
    assert driver.fix_step == 10
    budgets = []
    for step in range(20):
        budgets.append(pm.stats()["budget"])
        x = torch.randn(8, 16)
        model(x).sum().backward()
        driver.optimizer_step()
        if step < 10:  # projected onto this step's budget
            assert not pm._fixed and float(pm.scores.detach().sum()) <= pm.budget * (1 + 1e-6)
        driver.after_step(step + 1)
        assert pm._fixed == (step + 1 >= 10)
    assert budgets[0] == 1.0 and budgets[-1] == pytest.approx(pm.target_kept / pm.total)
    assert budgets == sorted(budgets, reverse=True)
    out = driver.finish()
    assert out is model and type(model) is nn.Sequential
    kept = sum(int((model.get_parameter(t.name) != 0).sum()) for t in pm.targets)
    assert kept == pm.target_kept == int(0.1 * pm.total)
    assert all("parametrizations" not in k for k in model.state_dict())


def test_loss_scale_is_divided_out_and_overflow_skips_the_step():
    plain, scaled = _mlp(), _mlp()
    a, b = StepDriver(0.8), StepDriver(0.8)
    a.attach(plain), b.attach(scaled)
    a.start(10, 0, "test"), b.start(10, 0, "test")
    _train(a, plain, 6)
    _train(b, scaled, 6, scale=1024.0)
    torch.testing.assert_close(a.probmask.scores, b.probmask.scores, rtol=1e-5, atol=1e-6)
    before = b.probmask.scores.detach().clone()
    b.probmask.scores.grad = torch.full_like(before, float("inf"))
    assert b.optimizer_step(1024.0) is False
    assert torch.equal(b.probmask.scores.detach(), before) and b.probmask.scores.grad is None
    b.probmask.scores.grad = torch.full_like(before, float("nan"))  # unscaled: the projection refuses it
    with pytest.raises(ValueError, match="NaN or inf in the scores"):
        b.optimizer_step()


def test_state_round_trip_resumes_identically():
    first = StepDriver(0.9)
    first.attach(_mlp())
    first.start(12, 0, "test")
    _train(first, first.probmask.model, 5)
    saved_state = first.state_dict()
    weights = {k: v.clone() for k, v in first.probmask.model.state_dict().items()}

    second = StepDriver(0.9)
    second.load_state_dict(saved_state)  # before attach: applied when the model arrives
    model = _mlp()
    second.attach(model)
    model.load_state_dict(weights)
    second.start(12, 5, "test")
    # the weights' SGD has no state, so the rest of the run is the same computation
    _train(second, model, 12, start=5)
    whole = StepDriver(0.9)  # the uninterrupted run, on the same batches
    whole.attach(_mlp())
    whole.start(12, 0, "test")
    _train(whole, whole.probmask.model, 5)
    _train(whole, whole.probmask.model, 12, start=5)
    assert second.probmask._fixed and torch.equal(second.probmask.mask, whole.probmask.mask)
    assert torch.equal(second.probmask.scores, whole.probmask.scores)
    for key, value in whole.probmask.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_unknown_length_and_bad_options_are_clear_errors():
    driver = StepDriver(0.9)
    with pytest.raises(RuntimeError, match="not attached"):
        driver.start(10, 0, "x")
    driver.attach(_mlp())
    for bad in (None, float("inf"), 0, -1):
        with pytest.raises(ValueError, match="needs the number of optimizer steps.*set max_steps"):
            driver.start(bad, 0, "trainer.max_steps")
    with pytest.raises(ValueError, match="fix_at"):
        StepDriver(0.9, fix_at=0)
    with pytest.raises(ValueError, match="score_lr"):
        StepDriver(0.9, score_lr=-1)
    with pytest.raises(ValueError, match="sparsity"):
        StepDriver(1.5)
    with pytest.raises(RuntimeError, match="another model"):
        driver.attach(_mlp())
    fixed = StepDriver(0.9)
    fixed.attach(_mlp())
    fixed.start(10, 0, "x")
    fixed.after_step(8)
    state = fixed.state_dict()
    again = StepDriver(0.9)
    again.attach(_mlp())
    again.load_state_dict(state)
    with pytest.raises(ValueError, match="already fixed"):
        again.start(10, 3, "x")
    other = StepDriver(0.9, fix_at=0.5)
    other.attach(_mlp())
    with pytest.raises(ValueError, match="fix_at"):
        other.load_state_dict(state)


def test_tied_weights_stay_dense_and_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.hidden = nn.Linear(8, 8)
            self.decode = nn.Linear(8, 10, bias=False)
            self.decode.weight = self.embed.weight

        def forward(self, x):
            return self.decode(torch.relu(self.hidden(self.embed(x))))

    model = Tied()
    assert tied_weights(model) == {"embed.weight": ["decode.weight"]}
    driver = StepDriver(0.5)
    pm = driver.attach(model)
    assert [t.name for t in pm.targets] == ["hidden.weight"]
    driver.start(4, 0, "x")
    driver.finish()
    assert model.decode.weight is model.embed.weight


def test_the_library_imports_no_training_framework():
    code = ("import sys, probmask, probmask.integrations, probmask.integrations.driver; probmask.ProbMask; "
            "print(sorted(m for m in ('transformers', 'lightning', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
