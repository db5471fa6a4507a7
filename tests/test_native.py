"""The compiled CPU kernels (probmask.kernels._cpu via probmask.kernels.cpu) against the PyTorch way."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import probmask
from probmask.kernels import cpu as native
from probmask.masks import EPS, relaxed_mask, relaxed_masked_weights

needs_kernels = pytest.mark.skipif(not native.available(), reason="the compiled kernels are not built")


def test_kernels_are_built_where_they_can_be():
    """A machine with a C compiler and the Python headers must have built them: a silent build
    failure would otherwise only show as a slower product."""
    headers = Path(sysconfig.get_paths()["include"], "Python.h").exists()
    compiler = any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))
    if not (headers and compiler):
        pytest.skip("no C compiler or no Python headers: the PyTorch way is used")
    assert native.available(), "probmask.kernels._cpu did not build: run `pip install -e .` and read its output"


@needs_kernels
@pytest.mark.parametrize(
    ("counter", "key", "expected"),
    [  # Random123's published known answers for Philox-4x32-10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    assert native.philox(counter, key) == expected


@needs_kernels
@pytest.mark.parametrize("offset", [0, 3, 1021, 2**33 + 5])
def test_uniforms_are_the_philox_words_of_their_index(offset):
    """The vectorised tiles against the plain one-counter reference, at unaligned offsets, across
    tile boundaries and with a block index above 2**32."""
    seed = 0x1234_5678_9ABC_DEF0 & (2**63 - 1)
    n = 3000
    u = native.uniform(n, seed, offset)
    key = (seed & 0xFFFFFFFF, seed >> 32)
    for i in [0, 1, 2, 3, 4, 1023, 1024, 1025, 2047, 2999]:
        block = (offset + i) >> 2
        word = native.philox((block & 0xFFFFFFFF, block >> 32, 0, 0), key)[(offset + i) & 3]
        assert float(u[i]) == (word >> 8) * 2.0**-24
    torch.testing.assert_close(u[500:], native.uniform(n - 500, seed, offset + 500), rtol=0, atol=0)


@needs_kernels
def test_uniforms_are_uniform_and_independent_across_seeds():
    n = 1 << 20
    u = native.uniform(n, 7)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.double().mean()) - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(float(u.double().var()) - 1 / 12) < 1e-3
    counts = torch.histc(u, bins=64, min=0, max=1).double()
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < 120  # 63 degrees of freedom: P(chi2 > 120) < 1e-5
    lag = float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])
    assert abs(lag) < 5 / n**0.5
    other = native.uniform(n, 8)
    assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 5 / n**0.5


def _problem(gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Flat scores with exact 0s, 1s, tiny and interior values; three layers; output gradients."""
    sizes = [3000, 1025, 7]
    total = sum(sizes)
    scores = torch.rand(total, generator=gen)
    scores[::5] = 0.0
    scores[1::5] = 1.0
    scores[2::11] = 1e-9
    weights = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    return scores, weights, grads


@needs_kernels
@pytest.mark.parametrize("temperature", [1.0, 4.0, 60.0])
def test_fused_kernels_match_the_pytorch_maths_on_the_same_noise(temperature):
    scores, weights, grads = _problem(torch.Generator().manual_seed(0))
    s1 = scores.clone().requires_grad_()
    w1 = [w.clone().requires_grad_() for w in weights]
    torch.manual_seed(11)
    outs = relaxed_masked_weights(s1, w1, temperature)
    torch.manual_seed(11)
    noise = native.uniform(scores.numel(), native.draw_seed())  # the key the forward drew
    loss = sum((o * g).sum() for o, g in zip(outs, grads))
    gs1, *gw1 = torch.autograd.grad(loss, [s1, *w1])

    s2 = scores.clone().requires_grad_()
    w2 = [w.clone().requires_grad_() for w in weights]
    mask = relaxed_mask(s2, noise, temperature).split([w.numel() for w in weights])
    ref = [w * m for w, m in zip(w2, mask)]
    loss2 = sum((o * g).sum() for o, g in zip(ref, grads))
    gs2, *gw2 = torch.autograd.grad(loss2, [s2, *w2])
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    for a, b in zip(gw1, gw2):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(gs1, gs2, rtol=1e-4, atol=1e-6)
    if temperature < 10:  # (at high temperatures the logits of most scores at 1 reach the cap)
        assert bool((gs1[1::5] != 0).any())  # scores at exactly 1 still get a gradient


@needs_kernels
def test_fused_kernels_match_the_float64_specification():
    scores, weights, _ = _problem(torch.Generator().manual_seed(1))
    for temperature in (1.0, 33.0):
        torch.manual_seed(3)
        outs = relaxed_masked_weights(scores, [torch.ones_like(w) for w in weights], temperature)
        torch.manual_seed(3)
        u = native.uniform(scores.numel(), native.draw_seed()).double().clamp_min(EPS)
        s = scores.double()
        logit = torch.log(s + EPS) - torch.log(1 - s + EPS) + torch.log(u) - torch.log(1 - u + EPS)
        spec = torch.sigmoid(logit * temperature)
        torch.testing.assert_close(torch.cat(outs).double(), spec, atol=2e-6, rtol=0)


@needs_kernels
def test_backward_regenerates_the_forward_noise_exactly():
    """Weight gradient = the forward's mask, bit for bit: the backward pass recomputes the
    noise and logits from the key instead of keeping them."""
    scores, weights, _ = _problem(torch.Generator().manual_seed(2))
    w = [x.clone().requires_grad_() for x in weights]
    outs = relaxed_masked_weights(scores, w, 5.0)
    grads = torch.autograd.grad(sum(o.sum() for o in outs), w)
    for o, x, g in zip(outs, weights, grads):
        torch.testing.assert_close(o, x * g, rtol=0, atol=0)


@needs_kernels
def test_seeded_runs_repeat_and_do_not_depend_on_threads():
    scores = torch.rand(1 << 19, generator=torch.Generator().manual_seed(4))
    weight = torch.randn(1 << 19, generator=torch.Generator().manual_seed(5))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            torch.manual_seed(9)
            results.append(relaxed_masked_weights(scores, [weight], 2.0)[0])
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    torch.testing.assert_close(results[0], results[2], rtol=0, atol=0)
    torch.manual_seed(10)
    assert not torch.equal(results[0], relaxed_masked_weights(scores, [weight], 2.0)[0])


@needs_kernels
def test_frozen_weights_get_no_gradient_and_scores_do():
    scores, weights, grads = _problem(torch.Generator().manual_seed(6))
    s = scores.clone().requires_grad_()
    outs = relaxed_masked_weights(s, weights, 2.0)  # weights do not require grad (supermask mode)
    (gs,) = torch.autograd.grad(sum((o * g).sum() for o, g in zip(outs, grads)), [s])
    assert torch.isfinite(gs).all() and bool((gs != 0).any())


@needs_kernels
def test_unsupported_tensors_take_the_pytorch_way(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the kernels must not see this")

    monkeypatch.setattr(native, "relaxed_forward", fail)
    scores = torch.rand(60, dtype=torch.float64)
    relaxed_masked_weights(scores, [torch.randn(60, dtype=torch.float64)], 2.0)  # float64
    w = torch.randn(2, 3, 5, 2).to(memory_format=torch.channels_last)
    relaxed_masked_weights(torch.rand(60), [w], 2.0)  # not contiguous
    monkeypatch.setenv(native.ENV, "0")
    relaxed_masked_weights(torch.rand(60), [torch.randn(60)], 2.0)  # turned off


@needs_kernels
def test_clamp_sums_match_pytorch_and_show_non_finite_scores():
    gen = torch.Generator().manual_seed(7)
    s = torch.rand(100_003, generator=gen) * 1.5 - 0.2
    for c in (-0.5, 0.0, 0.3, 0.99, 2.0):
        f, n, raw = native.clamp_sums(s, c)
        assert f == pytest.approx(float(torch.clamp(s - c, 0, 1).double().sum()), rel=1e-6, abs=1e-3)
        assert n == int(((s - c) > 0).sum())
        assert raw == pytest.approx(float(s.double().sum()), rel=1e-6)
    s[17] = float("nan")
    assert native.clamp_sums(s, 0.3)[2] != native.clamp_sums(s, 0.3)[2]  # NaN
    s[17] = float("inf")
    assert native.clamp_sums(s, 0.3)[2] == float("inf")


@needs_kernels
def test_projection_is_the_same_with_and_without_kernels(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    sizes = [5000, 300, 40]
    scores = torch.rand(sum(sizes), generator=gen) * 1.2
    scores[::3] = 1.0
    floors = [10.0, 200.0, 5.0]
    a = scores.clone()
    ra = probmask.project_(a, 900.0, sizes=sizes, floors=floors)
    monkeypatch.setenv(native.ENV, "0")
    b = scores.clone()
    rb = probmask.project_(b, 900.0, sizes=sizes, floors=floors)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-7)
    assert ra.floor_binding.tolist() == rb.floor_binding.tolist() == [False, True, True]
    assert float(a.double().sum()) <= 900.0 * (1 + 1e-6)


@needs_kernels
def test_loading_the_kernels_keeps_subnormal_arithmetic():
    """The module is built without -ffast-math, whose start-up code (linked by older GCC
    versions) would set flush-to-zero for the whole process and change PyTorch's results."""
    code = (
        "import torch, probmask.kernels.cpu as n; assert n.available(); "
        "x = torch.tensor([1e-39]) * 0.5; assert float(x) > 0, float(x)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)



def test_a_missing_build_says_so_and_how_to_fix_it(monkeypatch):
    monkeypatch.setattr(native, "_kernels", None)
    assert not native.available() and not native.enabled() and not native.supports(torch.rand(3))
    with pytest.raises(RuntimeError, match="not built.*reinstall"):
        native.uniform(4, 0)


def test_channels_last_weights_take_the_pytorch_way_with_the_kept_buffer():
    """Float32 CPU scores with weights the kernels do not take: ProbMask must hand the PyTorch
    way its kept scratch buffer (not a fresh full-size one every step) and still train."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 2))
    model[0].weight.data = model[0].weight.data.to(memory_format=torch.channels_last)
    pm = probmask.ProbMask(model, sparsity=0.5)
    pm.set_epoch(5, 10)
    model(torch.randn(4, 3, 6, 6)).sum().backward()
    assert pm._buffer is not None and pm._buffer.shape == pm.scores.shape
    assert torch.isfinite(pm.scores.grad).all() and bool(pm.scores.grad.abs().sum() > 0)
