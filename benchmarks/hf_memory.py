"""Training memory of the tiny-BERT example (examples/hf_text_classification.py) with and without
ProbMaskCallback, and what it is made of.

    python benchmarks/hf_memory.py [--steps 300] [--write]

Each mode runs in its own process. Reported per mode:
- peak RSS of the process, and how far training raised it above the peak before training
  (imports, data and model included in the first);
- the tensors training keeps: the model's parameters, the Trainer's AdamW state, ProbMask's
  scores with their Adam state;
- the bytes autograd saves for backward in one training forward pass of a batch (activations,
  and with ProbMask the relaxed masks), measured with ``torch.autograd.graph.saved_tensors_hooks``.

``--write`` puts the table into benchmarks/RESULTS.md between this benchmark's markers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- hf_memory.py begin -->", "<!-- hf_memory.py end -->"
MIB = 2**20


def _example():
    spec = importlib.util.spec_from_file_location("hf_example", ROOT / "examples" / "hf_text_classification.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_tensors(optimizer) -> list:
    return [v for state in optimizer.state.values() for v in state.values() if hasattr(v, "numel") and v.dim() > 0]


def measure(sparsity: float, steps: int) -> dict:
    # benchmarks/kernels.py would shadow the `kernels` package that transformers looks for
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    import torch

    example = _example()
    args = example.parse_args(["--sparsity", str(sparsity), "--steps", str(steps)])
    with tempfile.TemporaryDirectory() as out:
        trainer, callbacks = example.build(args, out)
        model = trainer.model
        data = trainer.train_dataset
        batch = {k: torch.stack([data[i][k] for i in range(32)]) for k in ("input_ids", "attention_mask", "labels")}
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if callbacks:
            callbacks[0].probmask.scores.grad = None
        saved = sum(storages.values())

        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    probmask = 0
    prunable = sum(w.numel() for w in example.prunable(model, callbacks))
    if callbacks:
        driver = callbacks[0].driver
        probmask = _tensor_bytes([driver.probmask.scores]) + _tensor_bytes(_state_tensors(driver.optimizer))
    return {"sparsity": sparsity, "steps": steps, "seconds": seconds, "rss_before": rss_before, "rss_peak": rss_peak,
            "parameters": _tensor_bytes(model.parameters()), "adamw_state": _tensor_bytes(_state_tensors(trainer.optimizer)),
            "probmask_state": probmask, "saved_for_backward": saved, "prunable": prunable}


def table(rows: list[dict]) -> str:
    lines = ["| | plain training | with ProbMaskCallback(0.9) |", "|---|---:|---:|"]

    def row(label: str, fmt) -> None:
        lines.append(f"| {label} | " + " | ".join(fmt(r) for r in rows) + " |")

    row("peak RSS of the process", lambda r: f"{r['rss_peak'] / MIB:.1f} MiB")
    row("raised by training above the peak before it", lambda r: f"{(r['rss_peak'] - r['rss_before']) / MIB:.1f} MiB")
    row("model parameters (float32)", lambda r: f"{r['parameters'] / MIB:.2f} MiB")
    row("AdamW state of the Trainer", lambda r: f"{r['adamw_state'] / MIB:.2f} MiB")
    row("ProbMask scores + their Adam state", lambda r: f"{r['probmask_state'] / MIB:.2f} MiB")
    row("saved for backward, one batch of 32", lambda r: f"{r['saved_for_backward'] / MIB:.2f} MiB")
    row(f"training time, {rows[0]['steps']} steps", lambda r: f"{r['seconds']:.1f} s")
    return "\n".join(lines)


def write_section(text: str) -> None:
    current = RESULTS_MD.read_text()
    section = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        RESULTS_MD.write_text(head + section + rest.split(END, 1)[1])
    else:
        RESULTS_MD.write_text(current.rstrip("\n") + "\n\n" + section + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.steps)))
        return
    rows = []
    for sparsity in (0.0, 0.9):
        out = subprocess.run([sys.executable, __file__, "--child", str(sparsity), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    text = table(rows)
    machine = f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPU cores"
    header = (f"Tiny BERT of examples/hf_text_classification.py (hidden 64, 2 layers, "
              f"{rows[1]['prunable']} prunable weights), batch 32, `python benchmarks/hf_memory.py "
              f"--steps {args.steps}` on {machine}:\n")
    print(header + "\n" + text)
    if args.write:
        write_section(header + "\n" + text)


if __name__ == "__main__":
    main()
