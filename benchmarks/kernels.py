"""How long do the per-weight parts of a ProbMask step take, with and without the compiled kernels?

On the flat scores of a model (default LeNet-300-100: 266,200 weights in 3 layers; 94% of the
scores at 0 and the rest spread over (0, 1], as in training at 99% sparsity), times

- mask forward: ``relaxed_masked_weights`` (noise, logits, mask, times the weight, every layer);
- mask forward + backward: the same plus ``torch.autograd.grad`` of a weighted sum of the outputs
  with respect to the scores and the weights;
- one projection evaluation: per-layer sum(clamp(s - c, 0, 1)) and #{s > c} (``_Plan.sums_all``,
  including setting up the plan, as every projection does);

each with the compiled kernels (``probmask.kernels._cpu``) and the PyTorch way (``probmask.kernels.use(fused=False)``),
median over repetitions, interleaved. Prints milliseconds and the ratio.

Usage: python benchmarks/kernels.py [--model lenet300|resnet32] [--reps N] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from probmask.app.models import build_model
from probmask.kernels import cpu as native
from probmask.masks import relaxed_masked_weights
from probmask.projection import _Plan
from probmask.selection import select_targets


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lenet300", choices=["lenet300", "resnet32"])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit("the compiled kernels are not built: pip install -e . with a C compiler")
    shape = (1, 28, 28) if args.model == "lenet300" else (3, 32, 32)
    model = build_model(args.model, 10, shape)
    weights = [getattr(model.get_submodule(t.module_name), t.param_name).detach().clone().requires_grad_()
               for t in select_targets(model)]
    sizes = [w.numel() for w in weights]
    gen = torch.Generator().manual_seed(0)
    scores = torch.zeros(sum(sizes))
    live = torch.rand(scores.numel(), generator=gen) < 0.06
    scores[live] = torch.rand(int(live.sum()), generator=gen)
    scores.requires_grad_()
    upstream = [torch.randn(w.shape, generator=gen) for w in weights]
    work = torch.empty_like(scores.detach())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}: "
        f"{scores.numel():,} scores in {len(sizes)} layers"
    )

    def forward(fused: bool) -> None:
        relaxed_masked_weights(scores, weights, 2.0, work, fused=fused)

    def forward_backward(fused: bool) -> None:
        outs = relaxed_masked_weights(scores, weights, 2.0, work, fused=fused)
        loss = sum((o * g).sum() for o, g in zip(outs, upstream))
        torch.autograd.grad(loss, [scores, *weights])

    def evaluation(fused: bool) -> None:
        plan = _Plan(scores.detach(), sizes, work, fused=fused, host=True)  # (the PyTorch way uses the kept buffer)
        plan.sums_all(0.01, check=True)

    parts = {"mask forward": forward, "mask forward + backward": forward_backward, "projection evaluation": evaluation}
    ways = {"kernels": True, "PyTorch": False}
    for name, fn in parts.items():
        times: dict[str, list[float]] = {w: [] for w in ways}
        for _ in range(5):  # warm-up
            for fused in ways.values():
                fn(fused)
        for _ in range(args.reps):
            for way, fused in ways.items():
                times[way].append(timed(lambda fn=fn, fused=fused: fn(fused)))
        k, p = (statistics.median(times[w]) * 1e3 for w in ways)
        print(f"  {name:24s} kernels {k:8.3f} ms   PyTorch {p:8.3f} ms   PyTorch / kernels {p / k:5.1f}x")


if __name__ == "__main__":
    main()
