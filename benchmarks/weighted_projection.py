"""How many evaluations and how long does one weighted projection take?

``probmask.weighted_projection.project_weighted_`` on 10^4, 10^5 and 10^6 scores split into seven
layers whose per-weight cost imitates the multiply-accumulates of a small convolutional network
(1024, 1024, 256, 256, 64, 64 output positions, then a linear layer at 1), for both metrics,
without and with per-layer floors (5% of each layer's whole cost: one or two of the seven bind). Score states imitate training:
per layer a density, about 0.7 d of the scores at 1, 0.6 d uniform in (0, 1), the rest at 0; the
budget is 97% of that state's cost; then every score moves by lr * clamp(N(0.3, 1), -1, 1),
lr = 6e-3, as an Adam step does. The search starts cold at 0; "warm" starts from the threshold of
the same state (training warm-starts from the previous step).

The unit: one naive evaluation ``sum(c * clamp(s - v, 0, 1))`` over all scores in float32, timed in
the same process; ``evaluations`` counts the search's passes (a layer's pass counts its share).

Usage: python benchmarks/weighted_projection.py [--reps N] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from probmask.weighted_projection import METRICS, project_weighted_

COSTS = [1024, 1024, 256, 256, 64, 64, 1]
SHARES = [0.005, 0.06, 0.12, 0.22, 0.25, 0.3, 0.045]  # of the scores per layer


def state(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int], float]:
    g = torch.Generator().manual_seed(seed)
    sizes = [max(1, round(n * x)) for x in SHARES]
    sizes[-1] += n - sum(sizes)
    parts = []
    for size in sizes:
        d = min(1.0, 0.1 * math.exp(float(torch.randn((), generator=g))))
        u = torch.rand(size, generator=g)
        parts.append(torch.where(u < 0.7 * d, 1.0, torch.where(u < 1.3 * d, torch.rand(size, generator=g), 0.0)))
    s = torch.cat(parts)
    c = torch.cat([torch.full((k,), float(x), dtype=torch.float64) for k, x in zip(sizes, COSTS)])
    budget = 0.97 * float(s.double() @ c)
    s += 6e-3 * (0.3 + torch.randn(s.shape, generator=g)).clamp(-1, 1)
    return s, c, sizes, budget


def best_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def measure(s, c, sizes, budget, floors, metric, start, reps):
    """The last result and the median milliseconds of one projection (the copy of the scores not
    counted)."""
    results = []

    def call():
        results.append(project_weighted_(s.clone(), c, budget, sizes=sizes, floors=floors, metric=metric,
                                         start=start))

    return results[-1] if call() is None else None, best_ms(call, reps) - best_ms(s.clone, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), best of {args.reps}")
    print(f"{'n':>9} {'metric':>10} {'floors':>6} {'start':>5} {'bound':>5} {'evals':>6} {'ms/call':>8} {'units':>6} {'naive ms':>8}")
    for n in (10_000, 100_000, 1_000_000):
        s, c, sizes, budget = state(n, seed=n)
        c32 = c.float()
        naive = best_ms(lambda s=s, c32=c32: float((c32 * (s - 0.01).clamp(0, 1)).sum()), args.reps)
        for metric in METRICS:
            for floors in (None, [0.05 * float(x.sum()) for x in c.split(sizes)]):
                first = project_weighted_(s.clone(), c, budget, sizes=sizes, floors=floors, metric=metric)
                for name, start in (("cold", 0.0), ("warm", first.threshold)):
                    r, ms = measure(s, c, sizes, budget, floors, metric, start, args.reps)
                    print(f"{n:>9} {metric:>10} {'yes' if floors else 'no':>6} {name:>5} {int(r.floor_binding.sum()):>5} {r.evaluations:>6.2f} "
                          f"{ms:>8.2f} {ms / naive:>6.1f} {naive:>8.3f}")

if __name__ == "__main__":
    main()
