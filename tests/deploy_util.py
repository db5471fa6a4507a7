"""Small pruned models shared by the export / sparse / evaluate tests (not a test module)."""

from __future__ import annotations

import torch
from torch import nn

from probmask import ProbMask
from probmask.export import Checkpoint, make_meta


class TinyCNN(nn.Module):
    """Conv + BatchNorm + Linear: covers buffers, biases and both kinds of prunable layer."""

    def __init__(self, num_classes: int = 10, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(width * 16, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def mlp(sizes: tuple[int, ...] = (64, 128, 64, 10)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def prune(model: nn.Module, sparsity: float, seed: int = 0, steps: int = 3,
          input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A real ProbMask fix: random scores, a few projected steps, top-k, finalize."""
    torch.manual_seed(seed)
    pm = ProbMask(model, sparsity=sparsity, floor=None)
    with torch.no_grad():
        pm.scores.uniform_(0.0, 1.0)
    pm.set_epoch(1, 1)
    pm.project()
    if input_shape is not None and steps:
        opt = torch.optim.Adam(pm.score_parameters(), lr=0.05)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(8, *input_shape)).pow(2).mean().backward()
            opt.step()
            pm.project()
    pm.fix_mask("topk")
    masks = pm.masks()
    final = pm.finalize().eval()
    return final, masks


def checkpoint(net: nn.Module, masks: dict[str, torch.Tensor], **info: object) -> Checkpoint:
    return Checkpoint(net.state_dict(), masks, make_meta(masks, **info))
