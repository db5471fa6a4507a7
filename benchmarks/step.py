"""What does ProbMask cost per training step, in time and in memory, against dense training?

For each model, three steps on the same random batch:

- dense: forward, backward, SGD step (lr 0.1, momentum 0.9, weight decay 5e-4);
- ProbMask K=1 and K=2: ``accumulate_samples`` (K forward/backward passes with relaxed masks,
  each loss divided by K), the same SGD step for the weights, an Adam step for the scores
  (lr 6e-3) and ``pm.project()``.

Both optimizers are PyTorch's fused ones (``fused=True``), as in the runner.

Models: LeNet-300-100 (batch 128, random 1x28x28 input) and a CIFAR-style ResNet-32 (batch 64,
random 3x32x32 input; the runner's `resnet32`: 3 stages of 5 basic blocks, 1x1-conv shortcuts;
channel widths 32-64-128 as in the paper by default, ``--width 16`` for the classic 16-32-64).
ProbMask runs at sparsity 0.99 at the middle of its schedules (``set_epoch(50, 100)``: the budget
binds and every step projects). Time: median over interleaved repetitions (dense, K=1, K=2,
dense, ...) after warm-up, ratio = median ProbMask step / median dense step.

Peak memory. CUDA: ``torch.cuda.max_memory_allocated`` over one warm step (after resetting the
peak), i.e. every live tensor: parameters, gradients, optimizer state, scores, the batch,
activations and temporaries. CPU: the same quantity from the CPU allocator's events recorded by
``torch.profiler`` (``profile_memory=True``): the model, ProbMask, optimizers and batch are built
inside the profiled region, so the running sum of allocated minus freed bytes is the total of
live tensors; we report its maximum during the third step (warm: gradients and optimizer state
exist) and, separately, its value when that step begins (persistent state).

Usage: python benchmarks/step.py [--quick] [--device cpu|cuda] [--models lenet,resnet32]
       [--width 32] [--reps N] [--threads N]
       PROBMASK_KERNELS=0 python benchmarks/step.py ...   # the PyTorch way instead of the compiled kernels
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

import probmask
from probmask import kernels
from probmask.app.models import build_model

SPARSITY = 0.99


# ---------------------------------------------------------------------------- one setup
class Setup:
    """A model with its optimizers (and ProbMask unless dense) and one random batch."""

    def __init__(self, name: str, width: int, dense: bool, device: torch.device, seed: int = 0) -> None:
        torch.manual_seed(seed)
        if name == "lenet":
            shape, batch = (1, 28, 28), 128
            self.model = build_model("lenet300", 10, shape)
        else:
            shape, batch = (3, 32, 32), 64
            self.model = build_model("resnet32", 10, shape, width=width)
        self.model.to(device).train()
        self.x = torch.randn(batch, *shape, device=device)
        self.y = torch.randint(0, 10, (batch,), device=device)
        self.pm = None if dense else probmask.ProbMask(self.model, SPARSITY)
        params = self.model.parameters() if self.pm is None else self.pm.weight_parameters()
        # fused steps (one kernel over all tensors), for dense and ProbMask alike, as the runner uses
        self.opt_w = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, fused=True)
        self.opt_s = None
        if self.pm is not None:
            self.pm.set_epoch(50, 100)
            self.opt_s = torch.optim.Adam(self.pm.score_parameters(), lr=6e-3, fused=True)

    def loss(self) -> torch.Tensor:
        return F.cross_entropy(self.model(self.x), self.y)

    def step(self, k: int = 1) -> None:
        self.opt_w.zero_grad(set_to_none=True)
        if self.pm is None:
            self.loss().backward()
            self.opt_w.step()
            return
        assert self.opt_s is not None
        self.opt_s.zero_grad(set_to_none=True)
        probmask.accumulate_samples(self.loss, k)
        self.opt_w.step()
        self.opt_s.step()
        self.pm.project()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- memory
def peak_memory(name: str, width: int, dense: bool, k: int, device: torch.device) -> tuple[int, int]:
    """(peak bytes of live tensors during the third step, live bytes when that step begins)."""
    if device.type == "cuda":
        setup = Setup(name, width, dense, device)
        for _ in range(2):
            setup.step(k)
        sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        setup.step(k)
        sync(device)
        return torch.cuda.max_memory_allocated(device), start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        setup = Setup(name, width, dense, device)
        for _ in range(2):
            setup.step(k)
        with record_function("measured_step"):
            setup.step(k)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    step = next(e for e in events if e.get("name") == "measured_step" and e.get("ph") == "X")
    t0, t1 = float(step["ts"]), float(step["ts"]) + float(step["dur"])
    memory = sorted(
        (float(e["ts"]), int(e["args"]["Bytes"]))
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    )
    live, start, peak = 0, None, 0
    for ts, nbytes in memory:
        if ts >= t0 and start is None:
            start = peak = live
        live += nbytes
        if t0 <= ts <= t1:
            peak = max(peak, live)
    assert start is not None
    return peak, start


# ---------------------------------------------------------------------------- main
def bench(name: str, width: int, reps: int, warmup: int, device: torch.device) -> None:
    dense = Setup(name, width, True, device)
    masked = Setup(name, width, False, device)
    assert masked.pm is not None
    label = "LeNet-300-100 (batch 128)" if name == "lenet" else f"ResNet-32 {width}-{2 * width}-{4 * width} (batch 64)"
    print(f"\n{label}: {masked.pm.total:,} prunable weights in {len(masked.pm.layout.sizes)} tensors")
    runs = {"dense": lambda: dense.step(), "K=1": lambda: masked.step(1), "K=2": lambda: masked.step(2)}
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(reps):
        for key, fn in runs.items():
            times[key].append(timed(fn, device))
    med = {key: statistics.median(v) for key, v in times.items()}
    mem = {
        "dense": peak_memory(name, width, True, 1, device),
        "K=1": peak_memory(name, width, False, 1, device),
        "K=2": peak_memory(name, width, False, 2, device),
    }
    for key in runs:
        peak, start = mem[key]
        print(
            f"  {key:5s}: step {med[key] * 1e3:9.2f} ms = {med[key] / med['dense']:5.2f}x dense "
            f"(min {min(times[key]) * 1e3:8.2f} ms); peak memory {peak / 2**20:8.2f} MiB = "
            f"{peak / mem['dense'][0]:4.2f}x dense (live at step start {start / 2**20:7.2f} MiB)"
        )


def _kernels_note(device: torch.device) -> str:
    impl = "C" if device.type == "cpu" else "Triton"
    if not kernels.available(device.type):
        return f"off ({impl} implementation not available here)"
    return f"on ({impl})" if kernels.settings().fused else f"off (PROBMASK_KERNELS=0; {impl} available)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, a smoke run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default="lenet,resnet32")
    parser.add_argument("--width", type=int, default=32, help="ResNet-32 first-stage width (paper: 32)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per step kind")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + "; fused kernels: " + _kernels_note(device)
    )
    for name in args.models.split(","):
        if name not in ("lenet", "resnet32"):
            raise SystemExit(f"unknown model {name!r}: use lenet and/or resnet32")
        default_reps, warmup = (200, 20) if name == "lenet" else (15, 2)
        if device.type == "cuda":
            default_reps, warmup = 100, 10
        reps = args.reps or (5 if args.quick else default_reps)
        bench(name, args.width, reps, 2 if args.quick else warmup, device)


if __name__ == "__main__":
    main()
