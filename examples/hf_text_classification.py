"""Sparsify a small BERT inside an unchanged Hugging Face ``Trainer`` script: one extra line.

The model is built from a ``BertConfig`` (nothing is downloaded); the data are short "reviews"
this script writes itself from word lists, labelled positive or negative by their words, with
"not" flipping the word after it. A word-level vocabulary stands in for a tokenizer.

    python examples/hf_text_classification.py                  # ProbMask at 90% sparsity
    python examples/hf_text_classification.py --sparsity 0     # the same script, plain training

It prints the test accuracy, the measured sparsity of the prunable weights, the training time
and the process's peak resident memory (``benchmarks/hf_memory.py`` compares the two modes).
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from probmask.integrations.transformers import ProbMaskCallback

POSITIVE = "good great fine superb lovely excellent pleasant brilliant wonderful solid".split()
NEGATIVE = "bad awful poor dull terrible boring weak clumsy dreadful bland".split()
NEUTRAL = "the film plot actor scene music story was and it a this with some very".split()
VOCAB = ["[PAD]", "[CLS]", "not", *POSITIVE, *NEGATIVE, *NEUTRAL]
LENGTH = 24


def review(rng: random.Random) -> tuple[list[str], int]:
    """A bag of neutral words with 1-4 opinion words; the label is the sign of their (negated) sum."""
    while True:
        words, total = [rng.choice(NEUTRAL) for _ in range(rng.randint(6, 14))], 0
        for _ in range(rng.randint(1, 4)):
            positive = rng.random() < 0.5
            negated = rng.random() < 0.2
            sign = (1 if positive else -1) * (-1 if negated else 1)
            phrase = (["not"] if negated else []) + [rng.choice(POSITIVE if positive else NEGATIVE)]
            at = rng.randint(0, len(words))
            words[at:at] = phrase
            total += sign
        if total != 0:
            return words, int(total > 0)


class Reviews(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        rng, index = random.Random(seed), {w: i for i, w in enumerate(VOCAB)}
        self.ids = torch.zeros(n, LENGTH, dtype=torch.long)
        self.mask = torch.zeros(n, LENGTH, dtype=torch.long)
        self.labels = torch.zeros(n, dtype=torch.long)
        for i in range(n):
            words, label = review(rng)
            ids = [index["[CLS]"], *(index[w] for w in words)][:LENGTH]
            self.ids[i, : len(ids)] = torch.tensor(ids)
            self.mask[i, : len(ids)] = 1
            self.labels[i] = label

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Reviews) -> float:
    model.eval()
    logits = model(input_ids=data.ids, attention_mask=data.mask).logits
    return float((logits.argmax(-1) == data.labels).float().mean())


def build(args: argparse.Namespace, out: str) -> tuple[Trainer, list[ProbMaskCallback]]:
    """The Trainer of this script; ``callbacks`` holds the ProbMaskCallback unless sparsity is 0."""
    torch.manual_seed(args.seed)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=4, intermediate_size=2 * args.hidden, max_position_embeddings=LENGTH,
                        num_labels=2)
    model = BertForSequenceClassification(config)
    callbacks = [ProbMaskCallback(sparsity=args.sparsity)] if args.sparsity > 0 else []  # the one extra line
    training = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=32,
                                 learning_rate=3e-3, warmup_steps=args.steps // 10, weight_decay=0.01,
                                 save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                                 logging_steps=max(1, args.steps // 4), seed=args.seed)
    trainer = Trainer(model=model, args=training, train_dataset=Reviews(4000, seed=args.seed), callbacks=callbacks)
    return trainer, callbacks


def prunable(model: torch.nn.Module, callbacks: list[ProbMaskCallback]) -> list[torch.Tensor]:
    """The weights ProbMask prunes (every Linear weight here), also when it did not run."""
    if callbacks:
        return [model.get_parameter(t.name) for t in callbacks[0].probmask.targets]
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9, help="0 trains without ProbMask")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        trainer, callbacks = build(args, out)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    weights = prunable(trainer.model, callbacks)
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    print(f"test accuracy {accuracy(trainer.model, Reviews(1000, seed=args.seed + 1000)):.4f}")
    print(f"sparsity of the {total} prunable weights: {zeros / total:.4f} ({zeros} zero)")
    print(f"training: {seconds:.1f} s, peak RSS {peak / 1024:.1f} MiB ({(peak - rss_before) / 1024:.1f} MiB "
          f"above the peak before training)")


if __name__ == "__main__":
    main(sys.argv[1:])
