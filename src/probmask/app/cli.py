"""The ``probmask`` command (also ``python -m probmask``).

Subcommands are added by registrars, functions ``register(subparsers)`` that add one or more
parsers and set ``func`` (called with the parsed arguments, returning the exit status): ``run``
here, ``export`` and ``eval`` in :mod:`probmask.app.deploy_cli`. Options and ``KEY=VALUE``
arguments may come in any order.

A :class:`probmask.app.errors.UserError` raised by any subcommand, and an ``OSError`` about the
user's files and disks (a full disk, a read-only folder, a path under a file), is printed as one
line on stderr and the exit status is 2; anything else is a bug and keeps its traceback. Ctrl-C
exits with status 130 and, once a run has written its directory, says how to resume it. Nothing
heavy (torch) is imported before :func:`main` is running, so an early Ctrl-C prints no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from probmask.app.errors import ENVIRONMENT_ERRNOS, UserError, describe_os_error

if TYPE_CHECKING:  # the runner (torch, data, models) is imported only when a run starts
    from probmask.app.experiment import RunResult

__all__ = ["REGISTRARS", "build_parser", "main", "parse_args"]

Registrar = Callable[[Any], None]  # register(subparsers) with argparse's subparsers action
RUN_EPILOG = """\
examples:
  probmask run                                        the default job: LeNet-300-100, mnist5k, 99%
  probmask run train.epochs=5 prune.sparsity=0.995    dotted overrides of any config key
  probmask run -c configs/cifar10_resnet32.yaml -o runs/r32
  probmask run --resume runs/r32                      continue an interrupted run
  probmask run --print-config                         every key with its value
  torchrun --standalone --nproc_per_node=4 -m probmask run -c configs/cifar10_resnet32.yaml
                                                      4 processes (GPUs), train.batch_size is global

outputs in the run directory: config.yaml, metrics.jsonl, checkpoint.pt, results.json,
model.pt, layer_density.png, training.png
"""


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


_handler = _StderrHandler()
_handler.setFormatter(_Formatter("%(message)s"))


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("probmask")
    if _handler not in logger.handlers:
        logger.addHandler(_handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


# ---------------------------------------------------------------------------------- run
def register_run(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run",
        help="sparsify a model as a config describes (default: LeNet-300-100 on mnist5k to 99%%)",
        description="Train with ProbMask, fix the mask, finetune, and write a run directory.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.epochs=5")
    p.add_argument("--config", "-c", metavar="FILE.yaml", help="YAML config (merged onto the defaults)")
    p.add_argument("--out", "-o", metavar="DIR", help="run directory (default: runs/<model>-<data>-<sparsity>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR with its saved config")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or epoch lines, only the summary")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_run)


def _resolve_run(args: argparse.Namespace) -> tuple[Any, Path, bool, list[Path]]:
    """(config, run directory, resume?, folders created) from the arguments; refuses mismatched
    combinations and a directory a new run would overwrite, then creates the run directory."""
    from probmask.app import rundir
    from probmask.app.artifacts import CONFIG
    from probmask.app.config import config_diff, load_config

    if args.resume is None:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.out) if args.out else rundir.default(cfg)
        rundir.check_new(run_dir)
        return cfg, run_dir, False, [] if args.print_config else rundir.create(run_dir)
    run_dir = Path(args.resume)
    if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
        raise UserError("--out and --resume name different directories; --resume DIR continues DIR in place")
    saved_path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run directory (it {'is a file' if run_dir.exists() else 'does not exist'})"
                        ": nothing to resume")
    if not saved_path.exists():
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG}): nothing to resume")
    saved = load_config(saved_path)
    if args.config is not None or args.overrides:
        requested = load_config(args.config if args.config is not None else saved_path, args.overrides)
        diff = config_diff(saved, requested)
        if diff:
            shown = "; ".join(f"{k}: {a!r} in the run, {b!r} requested" for k, a, b in diff[:4])
            more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
            raise UserError(f"{run_dir} was run with another config ({shown}{more}): resume it without "
                            "--config or overrides, or start a new run with --out")
    return saved, run_dir, True, []


def format_summary(result: RunResult) -> str:
    """What the user reads at the end of ``probmask run``."""
    r = result.results
    epochs = f"{r['epochs']['main']} main"
    if r["epochs"]["finetune"]:
        epochs += f" + {r['epochs']['finetune']} finetune"
    files = sorted(p.name for p in result.run_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    lines = [
        "",
        f"probmask run finished: {r['model']} on {r['data']}, method {r['method']}, "
        f"{epochs} epochs in {r['train_time_s']:.1f} s on {r['device']}",
        f"  test accuracy  {r['test_accuracy']:.2f}%",
        f"  sparsity       {100 * r['sparsity']:.2f}%  ({r['kept']:,} of {r['total']:,} prunable weights kept; "
        f"target {100 * r['target_sparsity']:.2f}%)",
        "",
        result.report.format(),
        "",
        f"outputs in {result.run_dir}/: {', '.join(files)}",
    ]
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    """Under ``torchrun --nproc_per_node=N`` every process runs this: rank 0 resolves the config
    and the run directory for all, logs, writes the files and prints the summary."""
    from probmask.app import rundir
    from probmask.app.config import config_to_yaml
    from probmask.app.distributed import DistContext
    from probmask.app.experiment import run_experiment

    dist = DistContext.from_env()
    run_dir, created = None, []
    try:
        if not dist.is_main:  # warnings and errors only
            logging.getLogger("probmask").setLevel(logging.WARNING)
        cfg, run_dir, resume, created = dist.on_main(lambda: _resolve_run(args))
        if args.print_config:
            if dist.is_main:
                print(config_to_yaml(cfg), end="")
            return 0
        progress = not args.quiet and sys.stderr.isatty()
        result = run_experiment(cfg, run_dir, resume=resume, progress=progress, dist=dist)
        if dist.is_main:
            print(format_summary(result))
        return 0
    except BaseException as err:
        if dist.is_main:
            rundir.remove_if_empty(created)  # a run that failed before writing anything leaves no trace
        if not isinstance(err, KeyboardInterrupt):
            raise
        if dist.is_main:  # a hint only where a run has started writing its directory
            hint = f"; continue with: probmask run --resume {run_dir}" if rundir.resumable(run_dir) else ""
            print(f"probmask: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        dist.close()


# ---------------------------------------------------------------------------------- parser
def _register_deploy(subparsers: Any) -> None:
    from probmask.app import deploy_cli  # imports torch: only once the command line is parsed

    deploy_cli.register(subparsers)


REGISTRARS: list[Registrar] = [register_run, _register_deploy]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="probmask",
        description="Sparsify neural networks under one global budget with probabilistic masks (ProbMask).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in REGISTRARS:
        register(subparsers)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Options and positional arguments in any order: argparse takes a ``nargs="*"`` positional
    (``run``'s ``KEY=VALUE`` overrides) only as one block, so later blocks come back as extras and
    are appended here, in order. Anything else left over is an error, as argparse would say."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        if hasattr(args, "overrides") and not any(e.startswith("-") for e in extras):
            args.overrides = [*args.overrides, *extras]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def _error(text: str) -> int:
    print(f"probmask: error: {' '.join(text.split())}", file=sys.stderr)  # one line, whatever the text
    return 2


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    _setup_logging(getattr(args, "quiet", False))
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        if getattr(err, "quiet", False):  # quiet: another process (rank 0) reports it
            return 2
        return _error(str(err))
    except OSError as err:  # a full disk, a read-only folder, a path under a file, ...
        if err.errno not in ENVIRONMENT_ERRNOS:
            raise
        return _error(describe_os_error(err))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return the exit status:
    0, 2 for a user error (one line on stderr), 130 when interrupted."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before a run started (``run`` says how to resume one)
        print("probmask: interrupted", file=sys.stderr)
        return 130
