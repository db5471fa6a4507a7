"""The Triton kernels (probmask.kernels.triton) against the C kernels, the PyTorch maths and the
float64 specification.

With CUDA they run on the GPU. Without it they run in Triton's interpreter on CPU tensors:
conftest.py sets ``TRITON_INTERPRET=1`` before Triton is imported. The interpreter is slow: the
problems are a few thousand elements, over several layers with unaligned offsets and sizes that
are not multiples of the kernels' blocks.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_util import PHILOX_KNOWN_ANSWERS  # noqa: E402
from probmask.kernels import cpu as native  # noqa: E402
from probmask.kernels import triton as tk  # noqa: E402
from probmask.masks import EPS, relaxed_mask  # noqa: E402
from probmask.numerics import limits  # noqa: E402

if not (tk.INTERPRET or torch.cuda.is_available()):  # pragma: no cover - conftest.py sets the interpreter
    pytest.skip("no CUDA and Triton's interpreter is off (TRITON_INTERPRET=1 before importing triton)",
                allow_module_level=True)
DEVICE = torch.device("cpu" if tk.INTERPRET else "cuda")
LIMITS = limits(torch.float32)
SEED = 0x1234_5678_9ABC_DEF0 & (2**63 - 1)
SIZES = [3001, 1026, 7]  # offsets 0, 3001, 4027: unaligned; across and short of 1024-element blocks
needs_c = pytest.mark.skipif(not native.available(), reason="the C kernels are not built")


def _seed(seed: int = SEED) -> torch.Tensor:
    return torch.tensor(seed, dtype=torch.int64, device=DEVICE)


def _problem(gen: torch.Generator, sizes=SIZES):
    """Flat scores with exact 0s, 1s, tiny and interior values; weights; output gradients."""
    scores = torch.rand(sum(sizes), generator=gen)
    scores[::5] = 0.0
    scores[1::5] = 1.0
    scores[2::11] = 1e-9
    weights = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    return scores.to(DEVICE), [w.to(DEVICE) for w in weights], [g.to(DEVICE) for g in grads]


def _masks(scores, temperature, seed, sizes=SIZES):
    """The masks themselves: the forward pass with weights of 1."""
    ones = [torch.ones(n, device=DEVICE) for n in sizes]
    return torch.cat(tk.relaxed_forward(scores, ones, temperature, seed, LIMITS))


# ------------------------------------------------------------------------------ the noise
@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    assert tk.philox(counter, key, DEVICE) == expected


@needs_c
@pytest.mark.parametrize("seed", [SEED, 2**63 - 1, 1])
@pytest.mark.parametrize("offset", [0, 3, 1021, 2**33 + 5])
def test_uniforms_are_the_c_kernels_bit_for_bit(offset, seed):
    """At unaligned offsets, across blocks, with a block index above 2**32 and keys whose high word
    is 0 or has its top bit clear."""
    n = 5000  # (uniform() runs 4096 elements per program)
    u = tk.uniform(n, seed, offset, DEVICE)
    assert u.dtype == torch.float32 and u.device == DEVICE
    assert torch.equal(u.cpu(), native.uniform(n, seed, offset))
    assert torch.equal(u[501:], tk.uniform(n - 501, _seed(seed), offset + 501))  # seed as a device tensor


def test_uniforms_are_words_of_their_index():
    """Without the C kernels: uniform i is (word (offset + i) & 3 of Philox block (offset + i) >> 2) >> 8, * 2^-24."""
    offset = 2**32 * 4 + 1021  # block index 2**32 + 255
    u = tk.uniform(16, SEED, offset, DEVICE).tolist()
    key = (SEED & 0xFFFFFFFF, SEED >> 32)
    for i in range(16):
        block = (offset + i) >> 2
        word = tk.philox((block & 0xFFFFFFFF, block >> 32, 0, 0), key, DEVICE)[(offset + i) & 3]
        assert u[i] == (word >> 8) * 2.0**-24


def test_uniforms_are_uniform_and_independent():
    n = 1 << 16
    u = tk.uniform(n, 7, 0, DEVICE).double().cpu()
    assert float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(float(u.var()) - 1 / 12) < 5 * ((1 / 80 - 1 / 144) / n) ** 0.5
    counts = torch.histc(u, bins=64, min=0, max=1)
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < 120  # 63 degrees of freedom: P(chi2 > 120) < 1e-5
    for lag in (1, 2, 4):  # neighbours in a Philox block, and the same word of the next block
        assert abs(float(torch.corrcoef(torch.stack([u[:-lag], u[lag:]]))[0, 1])) < 5 / n**0.5
    other = tk.uniform(n, 8, 0, DEVICE).double().cpu()  # the next key
    assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 5 / n**0.5
    shifted = tk.uniform(n, 7, 2**32 * 4, DEVICE).double().cpu()  # the same low counter word
    assert abs(float(torch.corrcoef(torch.stack([u, shifted]))[0, 1])) < 5 / n**0.5


# ------------------------------------------------------------------------------ the relaxed mask
@pytest.mark.parametrize("temperature", [1.0, 4.0, 60.0])
def test_kernels_match_the_pytorch_maths_on_the_same_noise(temperature):
    scores, weights, grads = _problem(torch.Generator().manual_seed(0))
    outs = tk.relaxed_forward(scores, weights, temperature, _seed(), LIMITS)
    gs1, gw1 = tk.relaxed_backward(scores, weights, grads, temperature, _seed(), LIMITS, True, [True] * 3)

    noise = tk.uniform(scores.numel(), SEED, 0, DEVICE)
    s2 = scores.clone().requires_grad_()
    w2 = [w.clone().requires_grad_() for w in weights]
    mask = relaxed_mask(s2, noise, temperature).split(SIZES)
    ref = [w * m for w, m in zip(w2, mask)]
    gs2, *gw2 = torch.autograd.grad(sum((o * g).sum() for o, g in zip(ref, grads)), [s2, *w2])
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    for a, b in zip(gw1, gw2):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(gs1, gs2, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(gs1).all()
    if temperature < 10:  # (at high temperatures the logits of most scores at 1 reach the cap)
        assert bool((gs1[1::5] != 0).any())  # scores at exactly 1 still get a gradient


def test_kernels_match_the_float64_specification():
    scores, _, _ = _problem(torch.Generator().manual_seed(1))
    u = tk.uniform(scores.numel(), SEED, 0, DEVICE).double().clamp_min(EPS)
    s = scores.double()
    worst = {}
    for temperature in (1.0, 33.0):
        m = _masks(scores, temperature, _seed()).double()
        logit = torch.log(s + EPS) - torch.log(1 - s + EPS) + torch.log(u) - torch.log(1 - u + EPS)
        spec = torch.sigmoid(logit * temperature)
        worst[temperature] = float((m - spec).abs().max())
        torch.testing.assert_close(m, spec, atol=2e-6, rtol=0)
        # the score gradient where it is not tiny: T m (1 - m) / (s (1 - s))
        ones = [torch.ones(n, device=DEVICE) for n in SIZES]
        gs, _ = tk.relaxed_backward(scores, ones, ones, temperature, _seed(), LIMITS, True, [False] * 3)
        dspec = temperature * spec * (1 - spec) / (s * (1 - s))
        big = (s > 1e-3) & (s < 1 - 1e-3) & (spec * (1 - spec) > 1e-6)
        assert int(big.sum()) > 100
        torch.testing.assert_close(gs.double()[big], dspec[big], rtol=1e-4, atol=0)


def test_backward_regenerates_the_forward_mask_bit_for_bit():
    scores, weights, grads = _problem(torch.Generator().manual_seed(2))
    outs = tk.relaxed_forward(scores, weights, 5.0, _seed(), LIMITS)
    ones = [torch.ones_like(w) for w in weights]
    _, masks = tk.relaxed_backward(scores, weights, ones, 5.0, _seed(), LIMITS, False, [True] * 3)
    for o, w, m in zip(outs, weights, masks):
        assert torch.equal(o, w * m)
    assert bool((torch.cat(masks) > 0).any()) and bool((torch.cat(masks) < 1).any())
    other = tk.relaxed_forward(scores, weights, 5.0, _seed(SEED + 1), LIMITS)
    assert not torch.equal(outs[0], other[0])  # another seed, another mask


def test_backward_computes_what_is_asked_and_the_same_either_way():
    scores, weights, grads = _problem(torch.Generator().manual_seed(3))
    full_s, full_w = tk.relaxed_backward(scores, weights, grads, 3.0, _seed(), LIMITS, True, [True] * 3)
    gs, gw = tk.relaxed_backward(scores, weights, grads, 3.0, _seed(), LIMITS, True, [False] * 3)
    assert gw == [None, None, None] and torch.equal(gs, full_s)
    assert gs.shape == scores.shape and gs.dtype == torch.float32
    gs, gw = tk.relaxed_backward(scores, weights, grads, 3.0, _seed(), LIMITS, False, [False, True, False])
    assert gs is None and gw[0] is None and gw[2] is None
    assert torch.equal(gw[1], full_w[1])
    # gradients that are not contiguous (autograd hands out expanded ones)
    expanded = [torch.ones((), device=DEVICE).expand(n) for n in SIZES]
    gs, gw = tk.relaxed_backward(scores, weights, expanded, 3.0, _seed(), LIMITS, True, [True] * 3)
    assert torch.equal(torch.cat(gw), _masks(scores, 3.0, _seed()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights(dtype):
    """out = (w * m).to(dtype) and grad_w = (m * g).to(dtype) rounded as PyTorch rounds (to nearest
    even), the score gradient as from the same values in float32."""
    scores, weights, grads = _problem(torch.Generator().manual_seed(4))
    m = _masks(scores, 2.0, _seed()).split(SIZES)
    wl = [(w * 50).to(dtype) for w in weights]
    gl = [g.to(dtype) for g in grads]
    outs = tk.relaxed_forward(scores, wl, 2.0, _seed(), LIMITS)
    gs, gw = tk.relaxed_backward(scores, wl, gl, 2.0, _seed(), LIMITS, True, [True] * 3)
    gs32, _ = tk.relaxed_backward(
        scores, [w.float() for w in wl], [g.float() for g in gl], 2.0, _seed(), LIMITS, True, [False] * 3
    )
    for o, w, g, gwl, ml in zip(outs, wl, gl, gw, m):
        assert o.dtype == gwl.dtype == dtype and o.shape == w.shape
        assert torch.equal(o, (w.float() * ml).to(dtype))
        assert torch.equal(gwl, (ml * g.float()).to(dtype))
    assert torch.equal(gs, gs32)


def test_layer_shapes_are_kept_and_empty_layers_pass():
    scores = torch.rand(2 * 3 * 5 + 7, device=DEVICE)
    weights = [torch.randn(2, 3, 5, device=DEVICE), torch.randn(0, 4, device=DEVICE), torch.randn(7, device=DEVICE)]
    outs = tk.relaxed_forward(scores, weights, 2.0, _seed(), LIMITS)
    assert [o.shape for o in outs] == [w.shape for w in weights]
    m = torch.cat(tk.relaxed_forward(scores, [torch.ones(30, device=DEVICE), torch.ones(7, device=DEVICE)], 2.0,
                                     _seed(), LIMITS))
    assert torch.equal(torch.cat([o.reshape(-1) for o in outs]), torch.cat([w.reshape(-1) for w in weights]) * m)


@needs_c
@pytest.mark.parametrize("temperature", [1.0, 4.0, 60.0])
def test_kernels_match_the_c_kernels(temperature):
    """The same seed, the same noise and maths: the masks agree to 2 float32 ulps of 1 (the last
    bits of log and exp differ: libm's in C, libdevice's on the GPU, NumPy's in the interpreter;
    1.2e-7 was the largest difference seen), the outputs and gradients accordingly."""
    scores, weights, grads = _problem(torch.Generator().manual_seed(5))
    m = _masks(scores, temperature, _seed()).cpu()
    m_c = torch.cat(native.relaxed_forward(scores.cpu(), [torch.ones(n) for n in SIZES], temperature, SEED, LIMITS))
    assert float((m - m_c).abs().max()) <= 2.4e-7
    cpu = dict(scores=scores.cpu(), weights=[w.cpu() for w in weights])
    outs = tk.relaxed_forward(scores, weights, temperature, _seed(), LIMITS)
    outs_c = native.relaxed_forward(cpu["scores"], cpu["weights"], temperature, SEED, LIMITS)
    for a, b, w in zip(outs, outs_c, cpu["weights"]):
        assert bool(((a.cpu() - b).abs() <= 4e-7 * w.abs()).all())
    gs, gw = tk.relaxed_backward(scores, weights, grads, temperature, _seed(), LIMITS, True, [True] * 3)
    gs_c, gw_c = native.relaxed_backward(
        cpu["scores"], cpu["weights"], [g.cpu() for g in grads], temperature, SEED, LIMITS, True, [True] * 3
    )
    for a, b, g in zip(gw, gw_c, grads):
        assert bool(((a.cpu() - b).abs() <= 4e-7 * g.cpu().abs()).all())
    torch.testing.assert_close(gs.cpu(), gs_c, rtol=1e-4, atol=1e-9)


# ------------------------------------------------------------------------------ the projection
def _clamp_sums_reference(scores, starts, sizes, thresholds):
    rows = []
    for a, n, c in zip(starts, sizes, thresholds.tolist()):
        s = scores[a : a + n]
        x = s - torch.tensor(c, dtype=torch.float32, device=s.device)  # rounded to float32
        rows.append(
            [float(x.clamp(0, 1).double().sum()), float((x > 0).sum()), float(s.double().sum())]
        )
    return torch.tensor(rows, dtype=torch.float64)


class _Launches:
    """Counts the launches of a kernel."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


def test_clamp_sums_match_torch_in_one_launch(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    scores = (torch.rand(12_000, generator=gen) * 1.5 - 0.2).to(DEVICE)
    scores[100:140] = 0.3  # exactly at a threshold
    starts = [0, 5001, 3, 9000, 7050, 11_990]
    sizes = [5000, 2049, 7, 0, 2048, 10]  # across, at and short of the 2048-element blocks
    launches = _Launches(tk._sums_kernel)
    monkeypatch.setattr(tk, "_sums_kernel", launches)
    for base in (-0.5, 0.0, 0.3, 0.99, 2.0):
        c = torch.tensor([base + 0.01 * k for k in range(len(sizes))], dtype=torch.float32)
        c[0] = base
        got = tk.clamp_sums(scores, starts, sizes, c.to(DEVICE))
        assert got.dtype == torch.float64 and got.shape == (len(sizes), 3) and got.device == DEVICE
        want = _clamp_sums_reference(scores, starts, sizes, c)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-9)
        assert torch.equal(got[:, 1].cpu(), want[:, 1])  # the counts exactly
        assert got[3].tolist() == [0.0, 0.0, 0.0]  # the empty layer
    assert launches.count == 5  # one per evaluation of all six layers


def test_clamp_sums_with_one_threshold_for_all():
    scores = torch.rand(6000, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    starts, sizes = [0, 2500, 4100], [2500, 1600, 1900]
    for c in (torch.tensor(0.4), torch.tensor([0.4])):
        got = tk.clamp_sums(scores, starts, sizes, c.to(DEVICE))
        want = _clamp_sums_reference(scores, starts, sizes, torch.full((3,), 0.4))
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-9)


def test_clamp_sums_show_non_finite_scores_and_repeat_bit_for_bit():
    scores = torch.rand(9000, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    starts, sizes, c = [0, 4000, 8000], [4000, 4000, 1000], torch.tensor([0.2, 0.5, 0.9], device=DEVICE)
    first = tk.clamp_sums(scores, starts, sizes, c)
    assert torch.equal(first, tk.clamp_sums(scores, starts, sizes, c))
    assert torch.isfinite(first).all()
    scores[4017] = float("nan")
    raw = tk.clamp_sums(scores, starts, sizes, c)[:, 2].tolist()
    assert raw[1] != raw[1] and raw[0] == first[0, 2] and raw[2] == first[2, 2]
    scores[4017] = float("inf")
    raw = tk.clamp_sums(scores, starts, sizes, c)[:, 2].tolist()
    assert raw[1] == float("inf") and raw[0] == first[0, 2]
    scores[4017] = -float("inf")
    assert tk.clamp_sums(scores, starts, sizes, c)[1, 2] == -float("inf")


# ------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_raise_value_errors():
    scores, weights, grads = _problem(torch.Generator().manual_seed(10))
    seed, meta = _seed(), torch.device("meta")

    def forward(s=scores, w=weights, sd=seed):
        return tk.relaxed_forward(s, w, 2.0, sd, LIMITS)

    def backward(g=grads, need_w=(True,) * 3, w=weights):
        return tk.relaxed_backward(scores, w, g, 2.0, seed, LIMITS, True, list(need_w))

    bad_calls = {
        "float64": lambda: forward(s=scores.double()),
        "flat": lambda: forward(s=scores.view(-1, 1)),
        "contiguous": lambda: forward(s=torch.stack([scores, scores], 1)[:, 0]),
        "elements": lambda: forward(w=weights[:2]),
        r"weights\[0\] is torch.float64": lambda: forward(w=[weights[0].double(), *weights[1:]]),
        r"weights\[0\] is not contiguous": lambda: forward(w=[torch.stack([weights[0]] * 2, 1)[:, 0], *weights[1:]]),
        "meta": lambda: forward(w=[weights[0].to(meta), *weights[1:]]),
        "int64": lambda: forward(sd=seed.int()),
        "0-d": lambda: forward(sd=seed.view(1)),
        "tensor": lambda: forward(sd=SEED),
        "seed is on": lambda: forward(sd=seed.to(meta)),
        "shape": lambda: backward(g=[grads[0][:-1], *grads[1:]]),
        "as many": lambda: backward(need_w=(True, True)),
        "grads": lambda: backward(g=grads[:2]),
        "float32, bfloat16": lambda: backward(g=[grads[0].double(), *grads[1:]]),
    }
    for message, call in bad_calls.items():
        with pytest.raises(ValueError, match=message):
            call()

    c = torch.tensor([0.5], device=DEVICE)
    bad_sums = {
        "float32 tensor": lambda: tk.clamp_sums(scores, [0], [10], c.double()),
        "one element per layer": lambda: tk.clamp_sums(scores, [0, 10, 20], [10, 10, 10], torch.zeros(2, device=DEVICE)),
        "not within": lambda: tk.clamp_sums(scores, [scores.numel() - 5], [10], c),
        "not within ": lambda: tk.clamp_sums(scores, [0], [-1], c),
        "starts for": lambda: tk.clamp_sums(scores, [0, 5], [10], c),
        "ints": lambda: tk.clamp_sums(scores, [0.5], [10], c),
        "thresholds is on": lambda: tk.clamp_sums(scores, [0], [10], c.to(meta)),
        "flat contiguous float32": lambda: tk.clamp_sums(scores.double(), [0], [10], c),
    }
    for message, call in bad_sums.items():
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match="2\\*\\*63"):
        tk.uniform(10, -1, 0, DEVICE)
    with pytest.raises(ValueError, match="32 bits"):
        tk.philox((0, 0, 0, 2**32), (0, 0), DEVICE)
    if tk.INTERPRET:
        with pytest.raises(ValueError, match="CUDA tensors"):
            tk.uniform(10, 1, 0, meta)
    else:
        with pytest.raises(ValueError, match="CUDA tensors"):
            forward(s=scores.cpu(), w=[w.cpu() for w in weights], sd=seed.cpu())
