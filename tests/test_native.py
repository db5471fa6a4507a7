"""The compiled CPU kernels (probmask.kernels._cpu via probmask.kernels.cpu) against the PyTorch way."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import probmask
from kernel_util import PHILOX_KNOWN_ANSWERS
from probmask import kernels
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
@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KNOWN_ANSWERS)
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


def _key_drawn() -> int:
    """The noise key the fused forward draws: a 63-bit integer from PyTorch's generator."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


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
    noise = native.uniform(scores.numel(), _key_drawn())  # the key the forward drew
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
        u = native.uniform(scores.numel(), _key_drawn()).double().clamp_min(EPS)
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
    relaxed_masked_weights(torch.rand(60), [torch.randn(60)], 2.0, fused=False)  # turned off
    with kernels.use(fused=False):  # a ProbMask created here takes the PyTorch way throughout
        model = torch.nn.Sequential(torch.nn.Linear(6, 4))
        pm = probmask.ProbMask(model, 0.5)
    pm.set_epoch(5, 10)
    model(torch.randn(3, 6)).sum().backward()
    pm.project()


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
def test_projection_is_the_same_with_and_without_kernels():
    gen = torch.Generator().manual_seed(8)
    sizes = [5000, 300, 40]
    scores = torch.rand(sum(sizes), generator=gen) * 1.2
    scores[::3] = 1.0
    floors = [10.0, 200.0, 5.0]
    a = scores.clone()
    ra = probmask.project_(a, 900.0, sizes=sizes, floors=floors)
    b = scores.clone()
    rb = probmask.project_(b, 900.0, sizes=sizes, floors=floors, fused=False)
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
    assert not native.available()
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


# ------------------------------------------------------------------------ portability of the C source

_SOURCE = Path(native.__file__).with_name("_cpu.c")
_ZIG = [sys.executable, "-m", "ziglang", "cc"]


@pytest.mark.parametrize(
    "compiler",
    [
        pytest.param([*_ZIG, "-target", "x86_64-linux-gnu"], id="clang-x86_64"),
        pytest.param([*_ZIG, "-target", "aarch64-linux-gnu"], id="clang-aarch64"),
        # the build for platforms without POSIX threads: every call in the calling thread
        pytest.param([*_ZIG, "-target", "aarch64-linux-gnu", "-DPROBMASK_NO_THREADS"], id="clang-aarch64-no-threads"),
        pytest.param(["gcc", "-Wextra", "-fPIC", "-pthread"], id="gcc-host"),
    ],
)
def test_the_c_source_compiles_warning_free_with_clang_for_x86_64_and_aarch64_and_with_gcc(compiler, tmp_path):
    """The compiler-specific parts of _cpu.c (GCC's optimize and target_clones attributes, the
    libmvec declarations of logf and expf) are guarded: clang, cross-compiling with ziglang, builds
    it for x86-64 and for aarch64 Linux without an error or a warning, and so does GCC here.

    The Python headers are the host's. Its pyconfig.h describes x86-64 Linux: LP64, little-endian,
    glibc. For what that header decides (type sizes, byte order, the functions available) aarch64
    Linux is the same, so it serves the aarch64 compile unchanged. The ziglang test dependency, and
    so this check, is installed on x86-64 Linux only."""
    if compiler[0] == sys.executable:
        if importlib.util.find_spec("ziglang") is None:
            pytest.skip("ziglang is not installed (the `test` extra installs it on x86-64 Linux)")
    elif shutil.which(compiler[0]) is None:
        pytest.skip(f"no {compiler[0]}")
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").exists():
        pytest.skip("no Python headers")
    obj = tmp_path / "_cpu.o"
    cmd = [*compiler, "-c", "-O2", "-std=c11", "-Wall", "-Werror", f"-I{include}", str(_SOURCE), "-o", str(obj)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}{result.stderr}"
    assert "warning" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert obj.stat().st_size > 0


# ------------------------------------------------------------------------ the C side checks its arguments

LIMITS = (87.0, 7.888609052210118e-31, 1.7632415262334313e-38)  # probmask.numerics.limits(float32)


def _floats(n: int, readonly: bool = False) -> memoryview:
    """A float32 buffer of n zeros. A memoryview, so that a test can see that the kernel let go of
    it: release() raises BufferError while the kernel still holds an export."""
    return memoryview(bytes(4 * n) if readonly else bytearray(4 * n)).cast("f")


def _release(args: dict) -> None:
    for value in args.values():
        if isinstance(value, memoryview):
            value.release()


def _forward_args(n: int = 10, **change) -> dict:
    args = dict(scores=_floats(n), weight=_floats(n), out=_floats(n), offset=0, seed=1, temperature=2.0,
                cap=LIMITS[0], mask_min=LIMITS[1], dmask_min=LIMITS[2], threads=2)
    return {**args, **change}


def _backward_args(n: int = 10, **change) -> dict:
    args = dict(scores=_floats(n), weight=_floats(n), grad=_floats(n), grad_weight=_floats(n),
                grad_scores=_floats(n), offset=0, seed=1, temperature=2.0, cap=LIMITS[0], mask_min=LIMITS[1],
                dmask_min=LIMITS[2], threads=2)
    return {**args, **change}


def _other_byte_order():
    return np.zeros(10, dtype=">f4" if sys.byteorder == "little" else "<f4")


def _misaligned():
    return np.frombuffer(bytearray(41), dtype=np.float32, count=10, offset=1)


_BAD_FORWARD = {  # id: (the arguments changed, the exception, words of its message)
    "float64": (lambda: dict(weight=np.zeros(10)), TypeError, "weight must hold float32"),
    "int32": (lambda: dict(weight=np.zeros(10, dtype=np.int32)), TypeError, "weight must hold float32"),
    "bytes": (lambda: dict(weight=bytes(40)), TypeError, "not format 'B'"),
    "byte-order": (lambda: dict(out=_other_byte_order()), TypeError, "out must hold float32"),
    "list": (lambda: dict(scores=[0.5] * 10), TypeError, "scores must support the buffer protocol"),
    "none": (lambda: dict(out=None), TypeError, "out must support the buffer protocol"),
    "strided": (lambda: dict(weight=np.zeros(20, dtype=np.float32)[::2]), ValueError, "weight must be C-contiguous"),
    "transposed": (lambda: dict(out=np.zeros((2, 5), dtype=np.float32).T), ValueError, "out must be C-contiguous"),
    "misaligned": (lambda: dict(out=_misaligned()), ValueError, "out is not aligned"),
    "read-only": (lambda: dict(out=_floats(10, readonly=True)), ValueError, "out is read-only"),
    "short-out": (lambda: dict(out=_floats(9)), ValueError, "out holds 9 elements and the weight 10"),
    "long-out": (lambda: dict(out=_floats(11)), ValueError, "out holds 11 elements"),
    "short-scores": (lambda: dict(scores=_floats(9)), ValueError, "scores holds 9 elements"),
    "offset-past-end": (lambda: dict(scores=_floats(12), offset=3), ValueError, "offset + n = 3 + 10"),
    "negative-offset": (lambda: dict(offset=-1), ValueError, "offset must lie in"),
    "huge-offset": (lambda: dict(offset=2**64), ValueError, "offset must lie in"),
    "float-offset": (lambda: dict(offset=1.0), TypeError, "offset must be an integer"),
    "negative-seed": (lambda: dict(seed=-1), ValueError, "seed must lie in [0, 9223372036854775807]"),
    "seed-2**63": (lambda: dict(seed=2**63), ValueError, "seed must lie in"),
    "str-seed": (lambda: dict(seed="1"), TypeError, "seed must be an integer"),
    "no-threads": (lambda: dict(threads=0), ValueError, "threads must be at least 1"),
    "negative-threads": (lambda: dict(threads=-3), ValueError, "threads must be at least 1"),
    "huge-negative-threads": (lambda: dict(threads=-(2**70)), ValueError, "threads must be at least 1"),
    "str-threads": (lambda: dict(threads="2"), TypeError, "threads must be an integer"),
    "zero-temperature": (lambda: dict(temperature=0.0), ValueError, "temperature must be a finite float32 > 0"),
    "negative-temperature": (lambda: dict(temperature=-1.0), ValueError, "temperature"),
    "nan-temperature": (lambda: dict(temperature=float("nan")), ValueError, "temperature"),
    "inf-temperature": (lambda: dict(temperature=float("inf")), ValueError, "temperature"),
    "float32-overflow": (lambda: dict(temperature=1e300), ValueError, "temperature"),
    "float32-underflow": (lambda: dict(temperature=1e-50), ValueError, "temperature"),
    "nan-cap": (lambda: dict(cap=float("nan")), ValueError, "cap must be"),
    "negative-mask-min": (lambda: dict(mask_min=-1e-30), ValueError, "mask_min must be a finite float32 >= 0"),
    "inf-dmask-min": (lambda: dict(dmask_min=float("inf")), ValueError, "dmask_min must be"),
}


@needs_kernels
@pytest.mark.parametrize("case", list(_BAD_FORWARD))
def test_forward_rejects_bad_arguments_before_touching_memory(case):
    change, error, message = _BAD_FORWARD[case]
    args = _forward_args(**change())
    out = args["out"]
    before = bytes(out) if isinstance(out, memoryview | np.ndarray) else None
    with pytest.raises(error) as info:
        native._kernels.relaxed_forward(*args.values())
    assert message in str(info.value)
    if before is not None:
        assert bytes(out) == before  # nothing written
    _release(args)  # BufferError if a buffer was not released


_BAD_BACKWARD = {
    "short-grad": (lambda: dict(grad=_floats(9)), ValueError, "grad holds 9 elements"),
    "float64-grad": (lambda: dict(grad=np.zeros(10)), TypeError, "grad must hold float32"),
    "long-grad-weight": (lambda: dict(grad_weight=_floats(11)), ValueError, "grad_weight holds 11 elements"),
    "read-only-grad-weight": (lambda: dict(grad_weight=_floats(10, readonly=True)), ValueError,
                              "grad_weight is read-only"),
    "short-grad-scores": (lambda: dict(grad_scores=_floats(9)), ValueError, "grad_scores holds 9 elements"),
    "grad-scores-past-offset": (lambda: dict(scores=_floats(20), grad_scores=_floats(12), offset=5), ValueError,
                                "grad_scores holds 12 elements, fewer than offset + n = 5 + 10"),
    "strided-grad-scores": (lambda: dict(grad_scores=np.zeros(20, dtype=np.float32)[::2]), ValueError,
                            "grad_scores must be C-contiguous"),
    "int-grad-scores": (lambda: dict(grad_scores=0), TypeError, "grad_scores must support the buffer protocol"),
    "seed-2**64": (lambda: dict(seed=2**64), ValueError, "seed must lie in"),
    "zero-temperature": (lambda: dict(temperature=0.0), ValueError, "temperature"),
    "no-threads": (lambda: dict(threads=0), ValueError, "threads"),
}


@needs_kernels
@pytest.mark.parametrize("case", list(_BAD_BACKWARD))
def test_backward_rejects_bad_arguments_before_touching_memory(case):
    change, error, message = _BAD_BACKWARD[case]
    args = _backward_args(**change())
    with pytest.raises(error) as info:
        native._kernels.relaxed_backward(*args.values())
    assert message in str(info.value)
    for name in ("grad_weight", "grad_scores"):
        if isinstance(args[name], memoryview):
            assert not any(args[name])  # nothing written
    _release(args)


@needs_kernels
def test_clamp_sums_uniform_and_philox_reject_bad_arguments():
    k = native._kernels
    with pytest.raises(TypeError, match="scores must hold float32"):
        k.clamp_sums(np.zeros(10), 0.3, 1)
    with pytest.raises(ValueError, match="scores must be C-contiguous"):
        k.clamp_sums(np.zeros(20, dtype=np.float32)[::2], 0.3, 1)
    with pytest.raises(ValueError, match="scores is not aligned"):
        k.clamp_sums(_misaligned(), 0.3, 1)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        k.clamp_sums(_floats(10), 0.3, 0)
    with pytest.raises(TypeError):
        k.clamp_sums(_floats(10), "0.3", 1)
    ones = np.ones(10, dtype=np.float32)
    for c in (1e300, float("inf"), -1e300, float("nan")):  # any threshold: no error
        assert k.clamp_sums(ones, c, 1)[2] == 10.0
    assert k.clamp_sums(ones, 1e300, 1) == (0.0, 0.0, 10.0)
    assert k.clamp_sums(_floats(10, readonly=True), 0.3, 1) == (0.0, 0.0, 0.0)  # read only: fine
    assert k.clamp_sums(np.zeros(0, dtype=np.float32), 0.3, 4) == (0.0, 0.0, 0.0)

    with pytest.raises(ValueError, match="out is read-only"):
        k.uniform(_floats(10, readonly=True), 0, 1)
    with pytest.raises(ValueError, match="seed must lie in"):
        k.uniform(_floats(10), 0, -1)
    with pytest.raises(ValueError, match="passes the last index"):
        k.uniform(_floats(10), 2**64 - 9, 1)
    last = _floats(10)
    k.uniform(last, 2**64 - 10, 1)  # indices up to 2**64 - 1: fine
    assert all(0 <= x < 1 for x in last)

    with pytest.raises(ValueError, match="a counter word must lie in"):
        k.philox((2**32, 0, 0, 0), (0, 0))
    with pytest.raises(ValueError, match="a key word must lie in"):
        k.philox((0, 0, 0, 0), (0, -1))
    with pytest.raises(TypeError):
        k.philox((0, 0, 0), (0, 0))


@needs_kernels
def test_kernels_release_their_buffers_and_take_any_float32_buffer():
    scores = np.linspace(0, 1, 3000, dtype=np.float32)
    args = _forward_args(n=3000)
    args["scores"][:] = memoryview(scores.tobytes()).cast("f")
    args["weight"][:] = memoryview(np.ones(3000, dtype=np.float32).tobytes()).cast("f")
    native._kernels.relaxed_forward(*args.values())
    mask = np.array(args["out"], dtype=np.float32)  # a copy: holds no export
    assert ((mask >= 0) & (mask <= 1)).all() and mask.std() > 0.1
    tensors = native.relaxed_forward(torch.from_numpy(scores), [torch.ones(3000)], 2.0, 1, LIMITS)
    assert mask.tobytes() == tensors[0].numpy().tobytes()
    _release(args)
    args = _backward_args(n=10, grad_weight=None)
    native._kernels.relaxed_backward(*args.values())
    _release(args)


@needs_kernels
def test_backward_writes_only_its_layer_of_the_score_gradient():
    k = native._kernels
    scores = np.full(30, 0.5, dtype=np.float32)
    grad_scores = np.full(30, -7.0, dtype=np.float32)
    ones = np.ones(10, dtype=np.float32)
    k.relaxed_backward(scores, ones, ones, None, grad_scores, 10, 1, 2.0, *LIMITS, 1)
    assert (grad_scores[:10] == -7).all() and (grad_scores[20:] == -7).all()
    assert np.isfinite(grad_scores[10:20]).all() and (grad_scores[10:20] != -7).all()


@needs_kernels
def test_the_wrappers_turn_wrong_tensors_into_errors():
    s = torch.rand(20)
    with pytest.raises(TypeError, match="float32"):
        native.clamp_sums(torch.rand(20, dtype=torch.float64), 0.3)
    with pytest.raises(ValueError, match="C-contiguous"):
        native.clamp_sums(s[::2], 0.3)
    assert native.clamp_sums(s[5:15], 0.0)[2] == pytest.approx(float(s[5:15].sum()))  # a view: its own elements
    with pytest.raises(ValueError, match="scores holds 20 elements"):
        native.relaxed_forward(s, [torch.randn(15), torch.randn(6)], 2.0, 1, LIMITS)
    with pytest.raises(ValueError, match="weight must be C-contiguous"):
        native.relaxed_forward(s, [torch.randn(4, 5).t()], 2.0, 1, LIMITS)
    with pytest.raises(TypeError, match="weight must hold float32"):
        native.relaxed_forward(s, [torch.randn(20, dtype=torch.float64)], 2.0, 1, LIMITS)
    with pytest.raises(ValueError, match="seed"):
        native.relaxed_forward(s, [torch.randn(20)], 2.0, -5, LIMITS)
    with pytest.raises(ValueError, match="grad holds 19 elements"):
        native.relaxed_backward(s, [torch.randn(20)], [torch.randn(19)], 2.0, 1, LIMITS, True, [True])
    with pytest.raises(ValueError, match="temperature"):
        native.relaxed_backward(s, [torch.randn(20)], [torch.randn(20)], 0.0, 1, LIMITS, True, [True])
    with pytest.raises(ValueError, match="seed"):
        native.uniform(5, 2**63)


# ------------------------------------------------------------------------ the worker pool

def _big(n: int = (1 << 20) + 123) -> tuple[np.ndarray, np.ndarray]:
    """Scores and weights long enough for 8 parts of the kernels' grain (2**17) and a short one."""
    gen = torch.Generator().manual_seed(21)
    return torch.rand(n, generator=gen).numpy(), torch.randn(n, generator=gen).numpy()


def _forward(s, w, threads):
    out = np.empty_like(w)
    native._kernels.relaxed_forward(s, w, out, 0, 77, 3.0, *LIMITS, threads)
    return out.tobytes()


def _backward(s, w, threads):
    gw, gs = np.empty_like(w), np.empty_like(s)
    native._kernels.relaxed_backward(s, w, w, gw, gs, 0, 77, 3.0, *LIMITS, threads)
    return gw.tobytes() + gs.tobytes()


@needs_kernels
def test_results_do_not_depend_on_the_threads():
    """The masks and gradients are the same for any number of threads. The sums are too, up to
    the float64 rounding of adding the parts' sums (the parts are fixed by the length and the
    threads asked for, never by the workers that happen to run them)."""
    s, w = _big()
    k = native._kernels
    forward, backward, sums = _forward(s, w, 1), _backward(s, w, 1), k.clamp_sums(s, 0.25, 1)
    for threads in (2, 3, 8, 64, 1000, 2**70):  # more than 64 counts as 64
        assert _forward(s, w, threads) == forward
        assert _backward(s, w, threads) == backward
        f, n, raw = k.clamp_sums(s, 0.25, threads)
        assert n == sums[1] and f == pytest.approx(sums[0], rel=1e-14) and raw == pytest.approx(sums[2], rel=1e-14)
        assert k.clamp_sums(s, 0.25, threads) == (f, n, raw)


@needs_kernels
def test_concurrent_calls_share_the_pool_safely():
    """Python threads calling the kernels at once (the GIL is released while they compute): one
    call uses the pool, the others run in their own thread; the results are the same."""
    s, w = _big()
    expected = _forward(s, w, 4), native._kernels.clamp_sums(s, 0.3, 4)
    results, errors = [], []

    def work():
        try:
            for _ in range(4):
                results.append((_forward(s, w, 4), native._kernels.clamp_sums(s, 0.3, 4)))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    workers = [threading.Thread(target=work) for _ in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=300)
    assert not errors and len(results) == 16
    assert all(r == expected for r in results)


_POOL_SCRIPT = r"""
import os, sys, threading
import numpy as np, torch
from probmask.kernels import _cpu as k

LIMITS = (87.0, 7.888609052210118e-31, 1.7632415262334313e-38)
gen = torch.Generator().manual_seed(3)
n = (1 << 20) + 5
s, w = torch.rand(n, generator=gen).numpy(), torch.randn(n, generator=gen).numpy()
torch.set_num_threads(1)

def tasks():
    return len(os.listdir("/proc/self/task"))

def run(threads=4):
    out = np.empty_like(w)
    k.relaxed_forward(s, w, out, 0, 11, 2.0, *LIMITS, threads)
    return out.tobytes(), k.clamp_sums(s, 0.4, threads)

before = tasks()
expected = run()
started = tasks() - before
assert started == 3, f"a call on 4 threads started {started} workers"
for _ in range(5):
    assert run() == expected
assert tasks() - before == 3, "the workers are kept and reused, not started per call"
assert run(8) == (run(1)[0], run(8)[1]) and tasks() - before == 7  # grown on demand

# fork while another thread is inside a kernel call on the pool
stop = False
def busy():
    while not stop:
        run()
thread = threading.Thread(target=busy, daemon=True)
thread.start()
try:
    for _ in range(3):
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one thread; its first parallel call starts a fresh pool
            os.close(r)
            ok = tasks() == 1 and run() == expected and tasks() == 4 and run() == expected
            os.write(wfd, b"1" if ok else b"0")
            os._exit(0)
        os.close(wfd)
        got = os.read(r, 1)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        assert got == b"1" and status == 0, (got, status)
finally:
    stop = True
thread.join()
assert run() == expected
print("ok")
"""


@needs_kernels
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc, forks")
def test_the_pool_is_kept_grows_on_demand_and_is_made_anew_after_fork():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _POOL_SCRIPT]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
