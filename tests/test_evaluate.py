"""MACs against hand counts, bytes, accuracy and the report."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from deploy_util import TinyCNN, mlp, prune
from probmask.evaluate import accuracy, count_macs, evaluate
from probmask.export import sparse_nbytes
from probmask.sparse import to_sparse


def test_linear_macs_by_hand():
    model = mlp((10, 20, 5))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[:3, :4] = 1.0  # 12 nonzeros
        model[2].weight[0, 0] = 0.0  # 99 of 100 nonzero
    report = count_macs(model, torch.randn(4, 10))
    by_name = {layer.name: layer for layer in report.layers}
    assert (by_name["0"].dense, by_name["0"].effective) == (200, 12)
    assert (by_name["2"].dense, by_name["2"].effective) == (100, 99)
    assert (report.dense, report.effective) == (300, 111)
    assert by_name["0"].kind == "Linear"


def test_linear_on_a_sequence_counts_every_position():
    layer = nn.Linear(6, 3)
    report = count_macs(layer, torch.randn(2, 5, 6))  # 5 positions per example
    assert report.layers[0].dense == 5 * 18


def test_conv_macs_by_hand():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 16x16 -> 8x8
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)  # weight (8, 2, 3, 3)
    model = nn.Sequential(conv, grouped)
    with torch.no_grad():
        conv.weight.mul_(torch.arange(conv.weight.numel()).reshape(conv.weight.shape) % 4 == 0)
    nnz = int((conv.weight != 0).sum())
    report = count_macs(model, torch.randn(2, 3, 16, 16))
    first, second = report.layers
    assert first.dense == 64 * 8 * 3 * 9
    assert first.effective == 64 * nnz
    assert second.dense == second.effective == 64 * 8 * 2 * 9


def test_conv_transpose_and_conv1d_by_hand():
    up = nn.ConvTranspose2d(4, 2, 2, stride=2)  # 5x5 -> 10x10; weight (4, 2, 2, 2)
    report = count_macs(up, torch.randn(1, 4, 5, 5))
    assert report.layers[0].dense == 25 * 4 * 2 * 2 * 2  # each input element meets each weight once
    conv1 = nn.Conv1d(2, 3, 5)  # length 20 -> 16
    assert count_macs(conv1, torch.randn(3, 2, 20)).layers[0].dense == 16 * 3 * 2 * 5


def test_macs_of_the_csr_model_equal_the_dense_models():
    model, _ = prune(TinyCNN(), 0.9, input_shape=(1, 8, 8))
    x = torch.randn(2, 1, 8, 8)
    dense = count_macs(model, x)
    sparse = count_macs(to_sparse(model, convs=True, max_density=1.0), x)
    assert [(m.dense, m.effective) for m in dense.layers] == [(m.dense, m.effective) for m in sparse.layers]


def test_shared_layer_counts_every_call():
    layer = nn.Linear(4, 4)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(self.layer(x))

    assert count_macs(Twice(), torch.randn(1, 4)).dense == 32


def test_accuracy_in_percent():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 1, 1])
    assert accuracy(model, [(x[:2], y[:2]), (x[2:], y[2:])]) == 75.0
    with pytest.raises(ValueError, match="no examples"):
        accuracy(model, [])


def test_evaluate_report():
    model, masks = prune(mlp((64, 128, 64, 10)), 0.95)
    x = torch.randn(5, 64)
    y = torch.randint(0, 10, (5,))
    report = evaluate(model, masks, torch.randn(2, 64), batches=[(x, y)])
    total = 64 * 128 + 128 * 64 + 64 * 10
    assert report.total == total
    assert report.kept == int(sum(m.sum() for m in masks.values()))
    assert report.sparsity == pytest.approx(1 - report.kept / total)
    assert report.dense_bytes == 4 * sum(p.numel() for p in model.parameters())
    assert report.sparse_bytes == sparse_nbytes(model.state_dict(), masks) < report.dense_bytes / 5
    assert report.macs.dense == total and report.macs.effective == report.kept
    assert report.test_accuracy is not None and 0 <= report.test_accuracy <= 100
    data = json.loads(json.dumps(report.to_dict()))
    assert data["effective_macs"] == report.kept
    text = report.format()
    assert "test accuracy" in text and "effective MACs" in text and "total" in text
    with pytest.raises(ValueError, match="name no tensor"):
        evaluate(model, {"nope.weight": masks["0.weight"]}, x)
