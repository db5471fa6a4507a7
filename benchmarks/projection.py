"""How long does one projection of all scores onto the global budget take?

Times ProbMask's real path (``pm.project()``: the NaN/inf check of the weights plus ``project_`` on
the flat score buffer with the layer sizes, the default ``"auto"`` floors and the kept work
buffer) on

- LeNet-300-100: 266,200 scores in 3 layers;
- ResNet-50 (torchvision, ``weights=None``): 25,502,912 scores in 54 conv/linear weights.

Score states imitate training. Each layer gets a density d_l proportional to exp(N(0, 1)), averaging to keep: about 0.7 d_l
of its scores at exactly 1, 0.6 d_l uniform in (0, 1) and the rest at exactly 0; the state is
projected onto the budget. Then two Adam-like steps: every score moves by
lr * clamp(N(0.3, 1), -1, 1), lr = 6e-3 (Adam moves each coordinate by about lr; the mean 0.3
pushes the sum above the budget, as the loss gradient does). The first step is projected and its
threshold kept; the second step's state is what we time. A cold start begins the threshold search
at 0, a warm start at the first step's threshold (training warm-starts from the previous step).

The unit is one step of the naive method, timed in the same process: evaluate
``sum(clamp(s - v, 0, 1))`` for one v over the per-layer score tensors (a Python loop over
layers, ending in one host sync). The authors' way, a bisection of at most 20 such steps with a
host sync per step and a stopping tolerance, is timed too. For both, the constraint violation
|sum(s) - k| / k is computed in float64 after projecting.

Usage: python benchmarks/projection.py [--quick] [--device cpu|cuda] [--reps N] [--threads N]
       PROBMASK_KERNELS=0 python benchmarks/projection.py ...   # the PyTorch way, without the compiled kernels
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

import probmask
from probmask import kernels
from probmask.app.models import build_model

LR = 6e-3  # the paper's score learning rate: the size of one Adam step per coordinate


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], reps: int, device: torch.device, setup=None) -> float:
    """Median wall time of ``fn()`` in seconds; ``setup()`` runs untimed before each call."""
    times = []
    for _ in range(reps):
        if setup is not None:
            setup()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def lenet() -> nn.Module:
    return build_model("lenet300", 10, (1, 28, 28))


def resnet50() -> nn.Module:
    return torchvision.models.resnet50(weights=None)


# ---------------------------------------------------------------------------- the authors' way
def naive_eval(layers: list[torch.Tensor], v: float) -> float:
    """One step of the naive method: sum(clamp(s - v, 0, 1)) over per-layer tensors, one sync."""
    return float(sum(torch.clamp(s - v, 0, 1).sum() for s in layers))


def naive_bisection(layers: list[torch.Tensor], k: float, max_iter: int = 20, tol: float = 1e-3) -> int:
    """The research code's projection: bisect v in [0, max s] with a host sync per step, in place.

    Returns the number of ``naive_eval`` calls (each one unit).
    """
    evals = 1
    if naive_eval(layers, 0.0) <= k:
        v = 0.0
    else:
        lo, hi = 0.0, max(float(s.max()) for s in layers)
        v = 0.5 * (lo + hi)
        for _ in range(max_iter):
            v = 0.5 * (lo + hi)
            obj = naive_eval(layers, v) - k
            evals += 1
            if abs(obj) < tol:
                break
            if obj < 0:
                hi = v
            else:
                lo = v
    for s in layers:
        s.sub_(v).clamp_(0, 1)
    return evals


# ---------------------------------------------------------------------------- score states
def score_states(pm: probmask.ProbMask, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """(the scores after an Adam-like step, the threshold of the step before: the warm start)."""
    keep = pm.budget / pm.total
    parts = []
    weights = torch.randn(len(pm.layout.sizes), generator=gen).exp()  # log-normal spread of the densities
    sizes = torch.tensor(pm.layout.sizes, dtype=torch.float64)
    densities = (keep * pm.total * weights / (weights * sizes).sum()).clamp(max=1.0).tolist()
    for size, d in zip(pm.layout.sizes, densities):  # ~0.7 d of a layer's scores at 1, ~0.6 d spread, rest 0
        u = torch.rand(size, generator=gen)
        part = torch.zeros(size)
        part[u < 0.7 * d] = 1.0
        spread = (u >= 0.7 * d) & (u < 1.3 * d)
        part[spread] = torch.rand(int(spread.sum()), generator=gen)
        parts.append(part)
    state = torch.cat(parts)
    probmask.project_(state, pm.budget, sizes=pm.layout.sizes, floors=pm.floors)  # a feasible state
    threshold = 0.0
    for step in range(2):  # two training-like steps; the first one's threshold is the warm start
        state.add_(torch.randn(pm.total, generator=gen).add_(0.3).clamp_(-1, 1).mul_(LR))
        if step == 0:
            threshold = probmask.project_(state, pm.budget, sizes=pm.layout.sizes, floors=pm.floors).threshold
    return state, threshold


def violation(total: float, k: float) -> float:
    return abs(total - k) / k


def bench_model(name: str, model: nn.Module, keep: float, reps: int, device: torch.device) -> None:
    model.to(device)
    pm = probmask.ProbMask(model, sparsity=1.0 - keep)
    pm.set_epoch(1.0, 1.0)  # the end of the budget schedule: k = target
    k = pm.budget
    gen = torch.Generator().manual_seed(0)
    state, prev_v = score_states(pm, gen)
    state = state.to(device)
    layers = [t.clone().view(shape) for t, shape in zip(state.split(pm.layout.sizes), pm.layout.weight_shapes)]
    print(
        f"\n{name}: {pm.total:,} scores in {len(pm.layout.sizes)} layers, keep {keep:.0%} "
        f"(k = {k:,.0f}), floors sum {sum(pm.floors):,}"
    )
    print(
        f"  state: {float((state <= 0).double().mean()):.1%} at <=0, "
        f"{float((state >= 1).double().mean()):.1%} at >=1, sum/k = {float(state.double().sum()) / k:.4f}; "
        f"previous threshold {prev_v:.5f}"
    )

    def reset_layers() -> None:
        for dst, src in zip(layers, state.split(pm.layout.sizes)):
            dst.view(-1).copy_(src)

    def setup(start: float) -> None:
        with torch.no_grad():
            pm.scores.copy_(state)
        pm._threshold = start  # the warm start pm.project() uses: the previous step's threshold

    # exactness and work, once
    reset_layers()
    evals = naive_bisection(layers, k)
    naive_viol = violation(sum(float(s.double().sum()) for s in layers), k)
    checks = {}
    for label, start in (("cold", 0.0), ("warm", prev_v)):
        setup(start)
        pm.project()
        with torch.no_grad():
            flat = state.clone()
            result = probmask.project_(flat, k, sizes=pm.layout.sizes, floors=pm.floors, start=start)
            assert torch.equal(flat, pm.scores.detach())
        checks[label] = (violation(float(pm.scores.detach().double().sum()), k), result)

    # timings, interleaved so that a slow spell of the machine hits every figure alike
    times: dict[str, list[float]] = {"unit": [], "naive": [], "cold": [], "warm": []}
    for _ in range(reps):
        for _ in range(3):
            times["unit"].append(median_time(lambda: naive_eval(layers, 0.5), 1, device))
        times["naive"].append(median_time(lambda: naive_bisection(layers, k), 1, device, setup=reset_layers))
        times["cold"].append(median_time(pm.project, 1, device, setup=lambda: setup(0.0)))
        times["warm"].append(median_time(pm.project, 1, device, setup=lambda: setup(prev_v)))
    med = {key: statistics.median(v) for key, v in times.items()}
    unit = med["unit"]
    print(f"  unit (one naive sum(clamp(s - v, 0, 1)) over {len(layers)} layers): {unit * 1e3:.2f} ms")
    print(
        f"  naive bisection:   {med['naive'] * 1e3:8.2f} ms = {med['naive'] / unit:5.2f} units, "
        f"{evals} evaluations, violation |sum-k|/k = {naive_viol:.2e}"
    )
    for label in ("cold", "warm"):
        viol, result = checks[label]
        print(
            f"  pm.project() {label}: {med[label] * 1e3:8.2f} ms = {med[label] / unit:5.2f} units, "
            f"{result.iterations} Newton evaluations, {int(result.floor_binding.sum())} floors binding, "
            f"violation |sum-k|/k = {viol:.2e}"
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
    parser.add_argument("--reps", type=int, default=None, help="repetitions per figure")
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
    for name, make, reps in (("LeNet-300-100", lenet, 50), ("ResNet-50", resnet50, 11)):
        reps = args.reps or (3 if args.quick else reps)
        for keep in (0.1, 0.01):
            bench_model(name, make(), keep, reps, device)


if __name__ == "__main__":
    main()
