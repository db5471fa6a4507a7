"""ProbMaskCallback in ``lightning.Trainer``: exact end state, schedule, resume, mixed precision, errors.

Tiny MLPs on random tensors on the CPU; the last test runs examples/lightning_mnist.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from probmask.budget import kept_count  # noqa: E402
from probmask.integrations.lightning import ProbMaskCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet_and_one_thread():
    # Lightning's advice about dataloader workers, loggers and small batch counts; networks this
    # small run fastest on one thread, and far faster than on two on a busy CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(threads)


class Net(L.LightningModule):
    """A small MLP; every training batch reseeds the global generator from its position in training
    (see test_resume_gives_the_uninterrupted_run), so the relaxed masks' noise does not depend on
    whether the run was resumed."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        self.automatic_optimization = not manual
        self.logit_dtypes: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        torch.manual_seed(1000 * self.current_epoch + batch_idx)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.logit_dtypes.add(logits.dtype)
        return nn.functional.cross_entropy(logits.float(), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)  # momentum: state to restore


def _data(batches: int, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch_size, 16, generator=gen)
    return x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()


def _loader(batches: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(*_data(batches)), batch_size=8)  # no shuffle: the same order every run


def _trainer(callbacks: list, **options) -> L.Trainer:
    options.setdefault("enable_checkpointing", False)
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks, **options)


class Recorder(L.Callback):
    """After every training batch (and so after ProbMaskCallback's own hook, listed before it):
    the step, whether the mask is fixed, the schedules' stats for the next step, the smallest score
    and the budget the batch was projected onto."""

    def __init__(self, cb: ProbMaskCallback) -> None:
        self.cb, self.rows, self.budget = cb, [], 1.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.budget = self.cb.probmask.budget

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pm = self.cb.probmask
        self.rows.append({"step": trainer.global_step, "fixed": pm._fixed, **pm.stats(),
                          "min_score": float(pm.scores.detach().min()), "projected_onto": self.budget})


def _kept(cb: ProbMaskCallback, module: nn.Module) -> int:
    return sum(int((module.get_parameter(t.name) != 0).sum()) for t in cb.probmask.targets)


def _assert_plain_and_exact(cb: ProbMaskCallback, module: nn.Module) -> None:
    assert type(module) is Net
    assert not any(parametrize.is_parametrized(m) for m in module.modules())
    assert all("parametrizations" not in key for key in module.state_dict())
    pm = cb.probmask
    assert _kept(cb, module) == pm.target_kept == kept_count(cb.driver.sparsity, pm.total)


def test_fit_with_accumulation_ends_plain_with_the_exact_count():
    cb, module = ProbMaskCallback(0.9, fix_at=0.5), Net()
    rec = Recorder(cb)
    _trainer([cb, rec], max_epochs=3, accumulate_grad_batches=2).fit(module, _loader(8))
    assert cb.driver.max_steps == 12 and rec.rows[-1]["step"] == 12  # 8 batches / 2, three epochs
    assert len(rec.rows) == 24
    _assert_plain_and_exact(cb, module)
    assert [r["step"] for r in rec.rows if r["fixed"]][0] == 6


def test_the_mask_is_fixed_at_the_rounded_fraction_of_the_steps_and_the_budget_shrinks_before():
    cb, module = ProbMaskCallback(0.8, fix_at=0.66), Net()
    rec = Recorder(cb)
    _trainer([cb, rec], max_steps=10).fit(module, _loader(8))  # crosses an epoch boundary
    assert cb.driver.max_steps == 10 and cb.driver.fix_step == round(0.66 * 10) == 7
    assert [r["step"] for r in rec.rows] == list(range(1, 11))
    assert [r["fixed"] for r in rec.rows] == [step >= 7 for step in range(1, 11)]
    learning = [r for r in rec.rows if not r["fixed"]]
    budgets = [r["budget"] for r in learning]
    assert budgets == sorted(budgets, reverse=True)
    assert budgets[0] == 1.0 and budgets[-1] == cb.probmask.target_kept / cb.probmask.total
    assert all(r["density"] * cb.probmask.total <= r["projected_onto"] * (1 + 1e-6) for r in learning)
    assert rec.rows[-1]["density"] == cb.probmask.target_kept / cb.probmask.total
    _assert_plain_and_exact(cb, module)


@pytest.mark.parametrize("resume_at", [4, 12])  # before and after the fix step, 8
def test_resume_gives_the_uninterrupted_run(tmp_path, resume_at):
    # Lightning's checkpoints hold no random number generator state; Net reseeds at every batch so
    # the resumed run draws the same relaxed masks as the uninterrupted one. Checkpoints at epoch
    # ends (4 batches an epoch): resumed mid-epoch, a plain DataLoader would start over at batch 0.
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1)
    whole_cb, whole = ProbMaskCallback(0.9, fix_at=0.5), Net()
    _trainer([whole_cb, saver], max_epochs=4, enable_checkpointing=True).fit(whole, _loader(4))
    assert whole_cb.driver.fix_step == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step={s}.ckpt" for s in (12, 16, 4, 8)]

    cb, module = ProbMaskCallback(0.9, fix_at=0.5), Net()
    rec = Recorder(cb)
    _trainer([cb, rec], max_epochs=4).fit(module, _loader(4), ckpt_path=tmp_path / f"step={resume_at}.ckpt")
    assert rec.rows[0]["step"] == resume_at + 1 and rec.rows[0]["fixed"] == (resume_at >= 8)
    assert torch.equal(cb.probmask.mask, whole_cb.probmask.mask)
    assert torch.equal(cb.probmask.scores, whole_cb.probmask.scores)
    expected = whole.state_dict()
    assert module.state_dict().keys() == expected.keys()
    for key, value in module.state_dict().items():
        assert torch.equal(value, expected[key]), key
    _assert_plain_and_exact(cb, module)


def test_saved_state_dict_gives_the_same_logits_in_a_plain_module(tmp_path):
    cb, module = ProbMaskCallback(0.75), Net()
    _trainer([cb], max_epochs=2).fit(module, _loader(8))
    torch.save(module.state_dict(), tmp_path / "pruned.pt")
    fresh = Net()
    fresh.load_state_dict(torch.load(tmp_path / "pruned.pt"))  # strict: the same keys as a plain Net
    x, _ = _data(4)
    module.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), module(x))
    assert _kept(cb, fresh) == cb.probmask.target_kept


def test_bf16_mixed_precision_trains_the_scores_and_ends_exact():
    cb, module = ProbMaskCallback(0.9, fix_at=0.75), Net()
    rec = Recorder(cb)
    _trainer([cb, rec], max_epochs=2, precision="bf16-mixed").fit(module, _loader(8))
    assert module.logit_dtypes == {torch.bfloat16}  # autocast was on
    learning = [r for r in rec.rows if not r["fixed"]]
    assert len(learning) == 11 and learning[0]["min_score"] < 1.0  # trained from the first step
    assert all(p.dtype == torch.float32 for p in module.parameters())
    _assert_plain_and_exact(cb, module)


def test_16_mixed_divides_the_loss_scale_out_of_the_score_gradients():
    cb, module = ProbMaskCallback(0.9, fix_at=0.75), Net()
    seen: list[tuple[float, torch.Tensor]] = []  # (scale, scaled gradient) as the backward left it
    stepped: list[torch.Tensor] = []  # the gradient the scores' Adam step uses

    class Before(L.Callback):  # listed before ProbMaskCallback: its hooks run first
        def on_train_start(self, trainer, pl_module):
            scores = cb.probmask.scores
            cb.driver.optimizer.register_step_pre_hook(lambda *_: stepped.append(scores.grad.clone()))

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grad = cb.probmask.scores.grad
            if grad is not None:
                seen.append((trainer.precision_plugin.scaler.get_scale(), grad.clone()))

    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))
    _trainer([Before(), cb], max_steps=4, plugins=[plugin]).fit(module, _loader(8))
    assert len(seen) == len(stepped) == 3  # steps 1-3; the mask is fixed after step round(0.75 * 4)
    for (scale, scaled), grad in zip(seen, stepped):
        assert scale == 1024.0 and bool(grad.abs().max() > 0)
        assert torch.equal(grad, scaled / scale)
    _assert_plain_and_exact(cb, module)


class Stream(IterableDataset):
    def __iter__(self):
        x, y = _data(4)
        return iter(zip(x.split(8), y.split(8)))


@pytest.mark.parametrize("options, loader, gives", [
    ({"max_epochs": -1, "max_steps": -1}, _loader, "inf"),
    ({"max_epochs": 2}, lambda: DataLoader(Stream(), batch_size=None), "-1"),  # no length, no max_steps
], ids=["endless-epochs", "stream-without-length"])
def test_an_unknown_number_of_steps_is_a_clear_error(options, loader, gives):
    cb, module = ProbMaskCallback(0.9), Net()
    with pytest.raises(ValueError, match=rf"number of optimizer steps.*gives {gives}\).*set max_steps"):
        _trainer([cb], **options).fit(module, loader())


def test_manual_optimization_is_refused():
    with pytest.raises(ValueError, match="needs automatic optimization.*StepDriver"):
        _trainer([ProbMaskCallback(0.9)], max_epochs=1).fit(Net(manual=True), _loader(4))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_puts_the_scores_on_the_device():
    cb, module = ProbMaskCallback(0.9, fix_at=0.5), Net()
    seen = []

    class Where(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(cb.probmask.scores.device.type)

    L.Trainer(accelerator="gpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, callbacks=[cb, Where()]).fit(module, _loader(8))
    assert set(seen) == {"cuda"}
    _assert_plain_and_exact(cb, module)


def test_mnist_example_reaches_the_exact_sparsity():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "lightning_mnist.py"), "--epochs", "2",
                          "--sparsity", "0.8", "--seed", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    acc = re.search(r"test accuracy ([\d.]+)", out.stdout)
    sparsity = re.search(r"sparsity ([\d.]+) \((\d+) of (\d+) prunable weights nonzero\)", out.stdout)
    assert acc and sparsity, out.stdout
    kept, total = int(sparsity[2]), int(sparsity[3])
    assert total == 784 * 300 + 300 * 100 + 100 * 10 and kept == kept_count(0.8, total) == 53240
    assert sparsity[1] == "0.800000"
    assert float(acc[1]) > 0.6  # chance is 0.1
