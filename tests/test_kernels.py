"""The fused kernels as PyTorch operators, and the one place that decides when they are used."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import probmask
from probmask import kernels
from probmask.kernels import ops
from probmask.masks import relaxed_masked_weights

needs_c = pytest.mark.skipif(not kernels.available("cpu"), reason="the C kernels are not built")
OPS = ("relaxed_masked_weights", "relaxed_masked_weights_backward", "clamp_sums")


def _layers(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(7, 5, generator=gen), torch.randn(33, generator=gen), torch.randn(2, 3, 4, generator=gen)]
    scores = torch.rand(sum(w.numel() for w in weights), generator=gen)
    scores[::4] = 1.0
    return scores, weights


@needs_c
def test_operators_pass_torch_library_opcheck():
    """Schema, fake (meta) implementation, autograd registration and the dispatcher agree with
    the real CPU implementation (torch.library.opcheck runs each check)."""
    scores, weights = _layers()
    seed = torch.tensor(12345, dtype=torch.int64)
    s = scores.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in weights]
    torch.library.opcheck(torch.ops.probmask.relaxed_masked_weights.default, (s, ws, 2.0, seed))
    grads = [torch.randn_like(w) for w in weights]
    torch.library.opcheck(torch.ops.probmask.relaxed_masked_weights_backward.default,
                          (scores, weights, grads, 2.0, seed, True, [True, False, True]))
    starts, sizes = [0, 35], [35, 33]
    torch.library.opcheck(torch.ops.probmask.clamp_sums.default,
                          (scores, starts, sizes, torch.tensor([0.3, 0.5])))


@needs_c
def test_operator_gradients_are_the_regenerated_masks():
    scores, weights = _layers(1)
    ws = [w.clone().requires_grad_() for w in weights]
    seed = torch.tensor(99, dtype=torch.int64)
    outs = ops.relaxed_masked_weights(scores.clone().requires_grad_(), ws, 3.0, seed)
    grads = torch.autograd.grad(sum(o.sum() for o in outs), ws)
    for o, w, g in zip(outs, weights, grads):  # d(w * m)/dw = m: out = w * grad, bit for bit
        torch.testing.assert_close(o, w * g, rtol=0, atol=0)


def test_every_operator_has_a_cuda_implementation():
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"probmask::{name}", "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"probmask::{name}", "CPU"), name


@needs_c
def test_the_cuda_implementations_agree_with_the_cpu_ones():
    """The functions registered for CUDA (Triton) run here on CPU tensors in Triton's interpreter
    (tests/conftest.py): with the same noise key they give the CPU operators' results to float32
    rounding, through the same glue (gradients not asked for come back empty)."""
    pytest.importorskip("triton")
    from probmask.kernels import triton as tk

    if not tk.INTERPRET:
        pytest.skip("with CUDA, tests/test_triton.py runs the kernels on the GPU")
    scores, weights = _layers(2)
    seed = torch.tensor(2024, dtype=torch.int64)
    cpu_out = ops.relaxed_masked_weights(scores, weights, 4.0, seed)
    cuda_out = ops._relaxed_cuda(scores, weights, 4.0, seed)
    for a, b in zip(cpu_out, cuda_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    grads = [torch.randn_like(w) for w in weights]
    need = [True, False, True]
    gs_c, gw_c = ops.relaxed_masked_weights_backward(scores, weights, grads, 4.0, seed, True, need)
    gs_t, gw_t = ops._backward_cuda(scores, weights, grads, 4.0, seed, True, need)
    torch.testing.assert_close(gs_c, gs_t, rtol=1e-4, atol=1e-6)
    assert gw_t[1].numel() == 0 and gw_c[1].numel() == 0
    torch.testing.assert_close(gw_c[0], gw_t[0], rtol=1e-5, atol=1e-6)
    thresholds = torch.tensor([0.1, 0.6], dtype=torch.float32)
    # (the C kernels add float32 sums of 128 elements in float64, Triton sums in float64)
    torch.testing.assert_close(ops.clamp_sums(scores, [0, 35], [35, 33], thresholds),
                               ops._clamp_sums_cuda(scores, [0, 35], [35, 33], thresholds), rtol=1e-6, atol=1e-6)


def test_settings_are_read_from_the_environment_once_and_changed_in_a_block():
    code = ("import probmask, torch; from probmask import kernels; "
            "pm = probmask.ProbMask(torch.nn.Linear(4, 4), 0.5); "
            "print(kernels.settings().fused, pm._fused)")
    for value, expected in (("0", "False False"), ("1", f"True {kernels.available('cpu')}")):
        env = {**__import__("os").environ, kernels.ENV: value}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == expected
    before = kernels.settings()
    with kernels.use(fused=False):
        assert kernels.settings().fused is False
        with kernels.use(search="device"):
            assert kernels.settings() == kernels.Settings(fused=False, search="device")
        assert kernels.settings().search == before.search
    assert kernels.settings() == before
    with pytest.raises(ValueError, match="search must be one of"), kernels.use(search="gpu"):
        pass


@needs_c
def test_a_probmask_created_with_the_kernels_off_draws_pytorch_noise():
    """The way is decided when a ProbMask is created: inside ``use(fused=False)`` its masks are
    PyTorch's (torch.rand noise) for its whole life, also when used outside the block."""
    scores, weights = _layers(3)
    model = torch.nn.Linear(5, 7, bias=False)
    with kernels.use(fused=False):
        pm = probmask.ProbMask(model, 0.5)
    pm.set_epoch(5, 10)
    with torch.no_grad():
        pm.scores.copy_(scores[:35])
    torch.manual_seed(5)
    out = model(torch.eye(5))  # rows of the masked weight, transposed
    torch.manual_seed(5)
    (expected,) = relaxed_masked_weights(pm.scores.detach(), [model.parametrizations.weight.original.detach()],
                                         pm.temperature, fused=False)
    torch.testing.assert_close(out.detach(), expected.T, rtol=0, atol=0)


@needs_c
def test_the_eager_path_equals_the_operator_bit_for_bit():
    """Eager mode calls the operator's implementations without the dispatcher: the same outputs
    and gradients, bit for bit, as the registered operator with its autograd formula."""
    scores, weights = _layers(4)
    seed = torch.tensor(4242, dtype=torch.int64)
    upstream = [torch.randn_like(w) for w in weights]
    results = []
    for fn in (ops.fused_relaxed_masked_weights, ops.relaxed_masked_weights):
        s = scores.clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in weights]
        outs = fn(s, ws, 1.5, seed)
        grads = torch.autograd.grad(sum((o * u).sum() for o, u in zip(outs, upstream)), [s, *ws])
        results.append([*outs, *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
