"""Accuracy against sparsity: methods x sparsities x seeds on one config (issue 4).

Every run is an ordinary ``probmask run`` run directory under ``OUT/runs/<method>/s<sparsity>/
seed<seed>``, made with :func:`probmask.app.experiment.run_experiment`; a run whose ``results.json``
exists is reused, an interrupted one (``checkpoint.pt`` only) is resumed, so the sweep can be
stopped and restarted at any time. ``dense`` does not depend on the sparsity and runs once per
seed. Runs go to ``--jobs`` worker processes (one CPU thread each by the config's ``threads``);
``--jobs 1`` runs them in this process, one after another.

Writes ``OUT/results.csv`` (one row per run), ``OUT/results.md`` (mean and sample standard
deviation over seeds per method and sparsity) and two PNGs: ``accuracy_vs_density.png`` (test
accuracy against the kept fraction on a log axis) and ``layer_density.png`` (the per-layer keep
ratios ProbMask learned beside those of global GMP).

Methods: the registered ones (see ``probmask.app.methods``) plus ``probmask_sm``, ProbMask in
supermask mode (``prune.freeze_weights=true``), which is the fair partner of ``edgepopup``.

Usage::

    python benchmarks/sweep.py                       # the full sweep on the default config
    python benchmarks/sweep.py --quick               # a few minutes: 2 sparsities, 1 seed, short runs
    python benchmarks/sweep.py --quick --dry         # seconds: tiny model and data (the test suite)
    python benchmarks/sweep.py --methods probmask gmp --sparsities 0.99 0.995 --seeds 0 1 2 \\
        --set train.score_lr=0.05                    # any config override, applied to every method
    python benchmarks/sweep.py --method-set gmp:train.lr=0.05   # ... or to one method's runs
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

SPARSITIES = [0.9, 0.95, 0.98, 0.99, 0.995]
METHODS = ["probmask", "gmp", "gmp_uniform", "oneshot", "random", "dense", "probmask_sm", "edgepopup"]
# each sweep method: the config overrides that select it
VARIANTS: dict[str, list[str]] = {
    "probmask": ["prune.method=probmask"],
    "probmask_sm": ["prune.method=probmask", "prune.freeze_weights=true"],
    "gmp": ["prune.method=gmp"],
    "gmp_uniform": ["prune.method=gmp_uniform"],
    "oneshot": ["prune.method=oneshot"],
    "random": ["prune.method=random"],
    "dense": ["prune.method=dense"],
    "edgepopup": ["prune.method=edgepopup", "prune.freeze_weights=true"],
}
# the full sweep uses the config's own epochs and batch, the same for every method unless --method-set
# says otherwise: the default job (60 + 10 epochs, batch 16, K=1) x 8 methods x 6 sparsities (with
# 99.9%) x 3 seeds took about 46 minutes on 2 cores with the compiled CPU kernels
# (benchmarks/RESULTS.md)
QUICK_EPOCHS, QUICK_FINETUNE = 10, 3
QUICK_SPARSITIES = [0.9, 0.99]
# --dry: a narrow LeNet on a few hundred digits, for the test suite
DRY = ["model.options.hidden=[32,16]", "data.train_size=128", "data.test_size=64", "train.batch_size=64"]
MAGNITUDE = ("gmp", "gmp_uniform", "oneshot")


def _run_dir(out: Path, method: str, sparsity: float, seed: int) -> Path:
    level = "all" if method == "dense" else f"s{sparsity:g}"
    return out / "runs" / method / level / f"seed{seed}"


def run_jobs(jobs: list[dict[str, Any]], report: Any, processes: int) -> None:
    """Run, resume or reuse every job with :func:`_one_run`, ``processes`` at a time (in spawned
    workers when more than one), calling ``report(i, outcome)`` as job ``i`` finishes."""
    if processes == 1:
        for i, job in enumerate(jobs):
            report(i, _one_run(job))
        return
    with multiprocessing.get_context("spawn").Pool(processes, maxtasksperchild=8) as pool:
        pending = {i: pool.apply_async(_one_run, (job,)) for i, job in enumerate(jobs)}
        while pending:
            for i in [i for i, res in pending.items() if res.ready()]:
                report(i, pending.pop(i).get())
            time.sleep(0.2)
        pool.close()  # let the workers exit by themselves: terminate() (the with) can leak a semaphore
        pool.join()


def _one_run(job: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume, or reuse) one run directory; returns its results.json plus timing."""
    import yaml

    from probmask.app.artifacts import CHECKPOINT, CONFIG, RESULTS
    from probmask.app.config import config_diff, config_from_dict, load_config
    from probmask.app.experiment import run_experiment

    run_dir = Path(job["run_dir"])
    cfg = load_config(job["config"], job["overrides"])
    if (run_dir / RESULTS).is_file():
        saved = config_from_dict(yaml.safe_load((run_dir / CONFIG).read_text()), where=str(run_dir / CONFIG))
        diff = config_diff(saved, cfg)
        if diff:
            shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff[:3])
            raise ValueError(f"{run_dir} holds a finished run of another config ({shown}); "
                             "use another --out or delete that run")
        return {"results": json.loads((run_dir / RESULTS).read_text()), "status": "reused", "wall_s": 0.0}
    begin = time.perf_counter()
    resume = (run_dir / CHECKPOINT).is_file()
    result = run_experiment(cfg, run_dir, resume=resume)
    return {"results": result.results, "status": "resumed" if resume else "ran", "wall_s": time.perf_counter() - begin}


def _jobs(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    jobs = []
    for seed in args.seeds:
        for sparsity in args.sparsities:
            for method in args.methods:
                if method == "dense" and sparsity != args.sparsities[0]:
                    continue
                overrides = [*args.base, *VARIANTS[method], f"prune.sparsity={sparsity}", f"seed={seed}", *args.set,
                             *args.method_set.get(method, [])]
                jobs.append({"method": method, "sparsity": sparsity, "seed": seed, "config": args.config,
                             "overrides": overrides, "run_dir": str(_run_dir(out, method, sparsity, seed))})
    return jobs


def _rows(jobs: Sequence[dict[str, Any]], outcomes: Sequence[dict[str, Any]], sparsities: Sequence[float]) -> list[dict[str, Any]]:
    rows = []
    for job, outcome in zip(jobs, outcomes):
        r = outcome["results"]
        for sparsity in (sparsities if job["method"] == "dense" else [job["sparsity"]]):
            rows.append({
                "method": job["method"], "target_sparsity": sparsity, "seed": job["seed"],
                "test_accuracy": r["test_accuracy"], "sparsity": r["sparsity"], "kept": r["kept"],
                "target_kept": r["target_kept"], "total": r["total"], "train_time_s": round(r["train_time_s"], 1),
                "layers": json.dumps({lay["name"]: lay["kept"] for lay in r["layers"]}),
                "run_dir": job["run_dir"],
            })
    return rows


def _stats(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _table(rows: Sequence[dict[str, Any]], methods: Sequence[str], sparsities: Sequence[float]) -> str:
    acc: dict[tuple[str, float], list[float]] = defaultdict(list)
    for row in rows:
        acc[row["method"], row["target_sparsity"]].append(row["test_accuracy"])
    seeds = sorted({row["seed"] for row in rows})
    lines = [
        f"Test accuracy (%), mean ± sample standard deviation over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); "
        "`dense` keeps every weight (one run per seed, repeated in each row). Margin: ProbMask minus the best "
        "magnitude baseline (gmp, gmp_uniform, oneshot), in points.",
        "",
        "| sparsity | " + " | ".join(methods) + " | margin vs best magnitude |",
        "|---" * (len(methods) + 2) + "|",
    ]
    for s in sparsities:
        cells, means = [], {}
        for m in methods:
            values = acc.get((m, s), [])
            if not values:
                cells.append("")
                continue
            mean, sd = _stats(values)
            means[m] = mean
            cells.append(f"{mean:.2f} ± {sd:.2f}" if len(values) > 1 else f"{mean:.2f}")
        magnitude = [means[m] for m in MAGNITUDE if m in means]
        margin = f"{means['probmask'] - max(magnitude):+.2f}" if "probmask" in means and magnitude else ""
        lines.append(f"| {100 * s:g}% | " + " | ".join(cells) + f" | {margin} |")
    return "\n".join(lines) + "\n"


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)


STYLE = {
    "probmask": ("tab:red", "o", "-"), "gmp": ("tab:blue", "s", "-"), "gmp_uniform": ("tab:cyan", "v", "--"),
    "oneshot": ("tab:purple", "D", "--"), "random": ("tab:gray", "x", ":"), "probmask_sm": ("tab:orange", "o", "-."),
    "edgepopup": ("tab:green", "^", "-."), "dense": ("black", "", "--"),
}


def _percent(value: float, _pos: Any = None) -> str:
    return f"{100 * value:g}%"


def _log_density_axis(ax: Any, densities: Sequence[float]) -> None:
    """A log x axis with a tick at each density, padded so that a single density still shows."""
    ax.set_xlim(min(densities) / 1.3, max(densities) * 1.3)
    ax.set_xscale("log")
    ax.set_xticks(densities)


def plot_accuracy(rows: Sequence[dict[str, Any]], methods: Sequence[str], path: Path, title: str) -> None:
    """Test accuracy against density (1 - sparsity) on a log axis, mean and spread over seeds:
    every method on the left, the weight-training methods zoomed in on the right."""
    acc: dict[tuple[str, float], list[float]] = defaultdict(list)
    for row in rows:
        acc[row["method"], row["target_sparsity"]].append(row["test_accuracy"])
    densities = sorted({1 - row["target_sparsity"] for row in rows})
    zoomed = [m for m in methods if m in ("probmask", "gmp", "gmp_uniform", "oneshot", "dense")]
    fig = Figure(figsize=(12, 5.2), layout="constrained")
    panels = [(fig.add_subplot(1, 2, 1), methods, "all methods"),
              (fig.add_subplot(1, 2, 2), zoomed, "weight-training methods, zoomed on the leaders")]
    for ax, shown, label in panels:
        for m in shown:
            points = sorted((1 - s, *_stats(v)) for (mm, s), v in acc.items() if mm == m)
            if not points:
                continue
            color, marker, line = STYLE.get(m, ("tab:brown", ".", "-"))
            x, y, err = zip(*points)
            if m == "dense":
                ax.axhline(y[0], color=color, linestyle=line, linewidth=1, label=f"dense ({y[0]:.1f}%)")
                continue
            ax.errorbar(x, y, yerr=err, color=color, marker=marker, linestyle=line, capsize=3, label=m)
        _log_density_axis(ax, densities)
        ax.xaxis.set_major_formatter(FuncFormatter(_percent))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, p: ""))
        ax.set_xlabel("weights kept (density = 1 - sparsity, log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="lower right", ncols=2)
        ax.set_title(label, fontsize=10)
    # the zoom frames the leaders (ProbMask, global GMP, dense); collapsing methods leave the frame
    zoom = [v for (m, _), vals in acc.items() if m in ("probmask", "gmp", "dense") for v in vals]
    if zoom:
        low, high = min(zoom), max(zoom)
        pad = max(0.5, 0.05 * (high - low))
        panels[1][0].set_ylim(low - pad, high + pad)
    fig.suptitle(title + " (error bars: standard deviation over seeds)", fontsize=11)
    _save(fig, path)


def plot_layers(rows: Sequence[dict[str, Any]], path: Path, title: str) -> bool:
    """Per-layer keep ratio against the overall density: ProbMask (solid) beside GMP (dashed)."""
    kept: dict[tuple[str, float, str], list[float]] = defaultdict(list)
    totals: dict[str, int] = {}
    shapes: dict[str, str] = {}
    for row in rows:
        if row["method"] in ("probmask", "gmp"):
            for name, k in json.loads(row["layers"]).items():
                kept[row["method"], row["target_sparsity"], name].append(k)
    if not kept:
        return False
    for row in rows:
        run = Path(row["run_dir"]) / "results.json"
        if row["method"] in ("probmask", "gmp") and run.is_file():
            for lay in json.loads(run.read_text())["layers"]:
                totals[lay["name"]] = lay["numel"]
                shapes[lay["name"]] = "x".join(map(str, lay["shape"]))
            break
    names = list(totals)
    fig = Figure(figsize=(11, 5.2), layout="constrained")
    ax = fig.add_subplot()
    colors = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    for i, name in enumerate(names):
        color = colors[i % len(colors)]
        for method, line, marker in (("probmask", "-", "o"), ("gmp", "--", "s")):
            points = sorted((1 - s, statistics.fmean(v) / totals[name]) for (m, s, n), v in kept.items()
                            if m == method and n == name)
            if points:
                x, y = zip(*points)
                ax.plot(x, y, color=color, linestyle=line, marker=marker, label=f"{name} {shapes[name]} ({method})")
    densities = sorted({1 - s for (_, s, _) in kept})
    ax.plot(densities, densities, color="black", linewidth=0.8, linestyle=":", label="overall density (uniform)")
    _log_density_axis(ax, densities)
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(_percent))
        axis.set_minor_formatter(FuncFormatter(lambda v, p: ""))
    ax.set_xlabel("weights kept overall (log scale)")
    ax.set_ylabel("weights kept in the layer (log scale)")
    ax.grid(alpha=0.3, which="both")
    fig.legend(fontsize=8, loc="outside right upper")  # beside the axes: the lines stay visible
    ax.set_title(title + "\nper-layer keep ratios: ProbMask (solid) and global GMP (dashed), mean over seeds",
                 fontsize=10)
    _save(fig, path)
    return True


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", default=None, help="YAML config (default: the runner's default job)")
    p.add_argument("--out", "-o", default="runs/sweep", help="output folder (default: runs/sweep)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=list(VARIANTS), metavar="METHOD",
                   help=f"methods (default: all: {' '.join(METHODS)})")
    p.add_argument("--sparsities", nargs="+", type=float, default=None, help=f"default {SPARSITIES}")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: 0 1 2; --quick: 0)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"main epochs (default: the config's; --quick {QUICK_EPOCHS}, --dry 1)")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help=f"finetune epochs (default: the config's; --quick {QUICK_FINETUNE}, --dry 1)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--method-set", nargs="+", default=[], metavar="METHOD:KEY=VALUE",
                   help="config overrides for one method's runs, after --set (e.g. gmp:train.lr=0.05: each "
                        "method at the setting it does best with)")
    p.add_argument("--jobs", "-j", type=int, default=2, help="runs at the same time, one process each (default 2)")
    p.add_argument("--quick", action="store_true", help="sparsities 0.9 and 0.99, one seed, short runs")
    p.add_argument("--dry", action="store_true", help="tiny model, data and epochs (seconds; for tests)")
    args = p.parse_args(argv)
    if args.sparsities is None:
        args.sparsities = QUICK_SPARSITIES if args.quick else SPARSITIES
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.epochs is None:
        args.epochs = 1 if args.dry else QUICK_EPOCHS if args.quick else None
    if args.finetune_epochs is None:
        args.finetune_epochs = 1 if args.dry else QUICK_FINETUNE if args.quick else None
    args.sparsities = sorted(set(args.sparsities))
    args.base = [*(DRY if args.dry else []),
                 *([f"train.epochs={args.epochs}"] if args.epochs is not None else []),
                 *([f"finetune.epochs={args.finetune_epochs}"] if args.finetune_epochs is not None else [])]
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    per_method: dict[str, list[str]] = defaultdict(list)
    for item in args.method_set:
        method, sep, override = item.partition(":")
        if not sep or method not in VARIANTS or "=" not in override:
            p.error(f"--method-set {item!r} must look like METHOD:KEY=VALUE with METHOD one of {', '.join(VARIANTS)}")
        per_method[method].append(override)
    args.method_set = dict(per_method)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from probmask.app.config import load_config
    from probmask.app.errors import UserError

    try:
        cfg = load_config(args.config, [*args.base, *args.set])  # a bad config fails here, before any run
        for overrides in args.method_set.values():
            load_config(args.config, [*args.base, *args.set, *overrides])
    except UserError as err:
        print(f"sweep: {err}", file=sys.stderr)
        return 2
    epochs = f"{cfg.train.epochs}+{cfg.finetune.epochs}"
    jobs = _jobs(args, out)
    own = "".join(f"; {m}: {' '.join(o)}" for m, o in args.method_set.items())
    print(f"sweep: {len(jobs)} runs ({', '.join(args.methods)} x sparsities {args.sparsities} x seeds {args.seeds}), "
          f"{epochs} epochs, {args.jobs} at a time, into {out}{own}", flush=True)
    begin = time.perf_counter()
    outcomes: list[dict[str, Any] | None] = [None] * len(jobs)

    def report(i: int, outcome: dict[str, Any]) -> None:
        outcomes[i] = outcome
        job, r = jobs[i], outcome["results"]
        done = sum(o is not None for o in outcomes)
        took = f"{outcome['wall_s']:.0f}s" if outcome["status"] != "reused" else "reused"
        print(f"[{done:>3}/{len(jobs)}] {job['method']:<12} sparsity {job['sparsity']:<6g} seed {job['seed']}: "
              f"test {r['test_accuracy']:6.2f}%  kept {r['kept']}/{r['total']}  ({took}, "
              f"{time.perf_counter() - begin:.0f}s elapsed)", flush=True)

    try:
        run_jobs(jobs, report, args.jobs)
    except (ValueError, UserError) as err:
        print(f"sweep: {err}", file=sys.stderr)
        return 2
    rows = _rows(jobs, [o for o in outcomes if o is not None], args.sparsities)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = f"{cfg.model.name} on {cfg.data.name}, {epochs} epochs"
    table = _table(rows, args.methods, args.sparsities)
    if args.method_set:
        table += "\nPer-method settings: " + "; ".join(f"{m}: `{' '.join(o)}`" for m, o in args.method_set.items()) + "\n"
    (out / "results.md").write_text(f"# {title}\n\n{table}")
    plot_accuracy(rows, args.methods, out / "accuracy_vs_density.png", title)
    plot_layers(rows, out / "layer_density.png", title)
    print(f"\n{table}\nwrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'accuracy_vs_density.png'}, "
          f"{out / 'layer_density.png'} ({time.perf_counter() - begin:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

