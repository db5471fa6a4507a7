"""ProbMask on a CUDA device with the Triton kernels: the fused path end to end, against the CPU.

Marked ``cuda``: they need a GPU, so they run where one is (``benchmarks/gpu.sh`` runs them with
tests/test_triton.py and tests/test_kernels.py, which also run on the GPU there); on a machine
without one they are skipped, and the Triton kernels are covered by tests/test_triton.py in
Triton's interpreter instead. Library only: no application dependency, so they run on a bare
machine with PyTorch and Triton.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import probmask
from probmask import kernels
from probmask.kernels import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run benchmarks/gpu.sh on one)"),
]
CUDA = torch.device("cuda")


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def test_probmask_takes_the_triton_kernels_and_trains():
    assert kernels.available("cuda")
    model = _mlp().to(CUDA)
    pm = probmask.ProbMask(model, 0.99)
    assert pm._fused
    pm.set_epoch(50, 100)
    opt_w = torch.optim.SGD(pm.weight_parameters(), lr=0.1, momentum=0.9)
    opt_s = torch.optim.Adam(pm.score_parameters(), lr=0.03)
    x, y = torch.randn(64, 1, 28, 28, device=CUDA), torch.randint(0, 10, (64,), device=CUDA)
    for _ in range(20):
        opt_w.zero_grad()
        opt_s.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert torch.isfinite(pm.scores.grad).all()
        opt_w.step()
        opt_s.step()
        pm.project()
        assert float(pm.scores.detach().double().sum()) <= pm.budget * (1 + 1e-6)
    pm.fix_mask()
    pm.finalize()
    kept = sum(int(torch.count_nonzero(model.get_parameter(t.name))) for t in pm.targets)
    assert kept == pm.target_kept


def test_the_gpu_draws_the_cpu_kernels_noise():
    """The same noise key gives the same masks on both devices, to float32 rounding (libdevice's
    log and exp against the C library's)."""
    if not kernels.available("cpu"):
        pytest.skip("the C kernels are not built here")
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(300, 784, generator=gen), torch.randn(77, generator=gen)]
    scores = torch.rand(sum(w.numel() for w in weights), generator=gen)
    seed = torch.tensor(123456789, dtype=torch.int64)
    cpu = ops.relaxed_masked_weights(scores, weights, 3.0, seed)
    gpu = ops.relaxed_masked_weights(scores.to(CUDA), [w.to(CUDA) for w in weights], 3.0, seed.to(CUDA))
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("search", ["device", "host"])
def test_projection_on_the_gpu_equals_the_cpu_one(search):
    gen = torch.Generator().manual_seed(2)
    sizes = [235200, 30000, 1000]
    scores = torch.rand(sum(sizes), generator=gen) * 1.2
    scores[::3] = 1.0
    floors = [300.0, 100.0, 10.0]
    on_cpu = scores.clone()
    probmask.project_(on_cpu, 2662.0, sizes=sizes, floors=floors)
    on_gpu = scores.to(CUDA)
    result = probmask.project_(on_gpu, 2662.0, sizes=sizes, floors=floors, search=search)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=2e-7)
    assert float(on_gpu.double().sum()) <= 2662.0 * (1 + 1e-6)
    assert result.iterations > 0


def test_compiled_training_is_one_graph_on_the_gpu():
    model = _mlp().to(CUDA)
    pm = probmask.ProbMask(model, 0.9)
    pm.set_epoch(5, 10)
    x = torch.randn(8, 1, 28, 28, device=CUDA)
    explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    compiled(x).square().sum().backward()
    assert torch.isfinite(pm.scores.grad).all() and bool(pm.scores.grad.abs().sum() > 0)
