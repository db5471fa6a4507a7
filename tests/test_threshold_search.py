"""The projection's threshold search as a plain function of f (tests/test_projection.py runs the
whole projection every way)."""

import pytest
import torch

from probmask import threshold_search


@pytest.mark.parametrize("case", [
    (-4.910684195971845e-07, 3000, 5.816459971044978e-05, -4.689979943363157e-07),
    (-8.927440532224757e-07, 1000, 3.176715078159125e-05, -8.636031007772048e-07),
    (-5.372379977476419e-07, 30000, 4.918238245180561e-05, -5.327848916278826e-07),
])
def test_search_does_not_cycle_on_a_jump(case):
    """f jumps across the target at a root (f = target + A left of it, target - A right of it):
    the Newton steps from each end of the bracket land, once rounded to float32, on the other
    end. Both searches must bisect instead of cycling (the earlier check compared the unrounded
    step with the bracket and cycled in about half of such cases until the iteration limit)."""
    root, n, jump, start = case
    target = 3.0

    def f(c: float) -> float:
        return target + jump if c < root else target - jump

    host = threshold_search._HostSearch(root - 1.0, target, lo_known=True)
    c = threshold_search._f32(start)
    for _ in range(64):
        nxt, done = host.step(c, f(c), float(n))
        if done:
            break
        c = threshold_search._f32(nxt)
    assert done and abs(threshold_search._HostSearch.round_up(nxt) - root) < 1e-12

    as_t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    device = threshold_search._DeviceSearch(as_t(root - 1.0), as_t(target), lo_known=True)
    c32 = torch.tensor([start], dtype=torch.float32)
    for _ in range(64):
        nxt_t, done_t = device.step(c32, as_t(f(float(c32))), as_t(float(n)))
        if bool(done_t.all()):
            break
        c32 = nxt_t.float()
    assert bool(done_t.all()) and abs(device.outcome()[0][0] - root) < 1e-12


def _run_host(search, f, c, steps=256):
    """Step a host search on f(c) -> (value, count) from c; (answer, steps taken)."""
    for n in range(1, steps + 1):
        value, count = f(c)
        nxt, done = search.step(c, value, count)
        if done:
            return nxt, n
        c = nxt
    raise AssertionError("no convergence")


def _run_device(search, f, c, steps=256):
    as_t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    c32 = torch.tensor([c], dtype=torch.float32)
    for n in range(1, steps + 1):
        value, count = f(float(c32))
        nxt, done = search.step(c32, as_t(value), as_t(count))
        if bool(done.all()):
            return search.outcome()[0][0], n
        c32 = nxt.float()
    raise AssertionError("no convergence")


def _clamp_sums(scores):
    s = torch.tensor(scores, dtype=torch.float32)

    def f(c: float):
        x = s - torch.tensor(c, dtype=torch.float32)  # float32, as the kernels compute it
        return float(x.clamp(0, 1).double().sum()), float((x > 0).sum())

    return f


def test_plateau_on_the_right_is_bisected():
    """73 scores far above the root (clamped at 1: the count overstates the slope there) and a
    few ordinary ones: from the right, Newton steps of (target - f) / count barely moved and f
    did not change; that took more than 256 evaluations. Now such a step bisects the bracket."""
    f = _clamp_sums([4.19e10] * 73 + [0.88, 0.48, 0.99, 0.3])
    target = 73.1
    for run, search in ((_run_host, threshold_search._HostSearch(0.0, target, lo_known=False)),
                        (_run_device, threshold_search._DeviceSearch(torch.zeros(1, dtype=torch.float64),
                                                                     torch.tensor([target], dtype=torch.float64),
                                                                     lo_known=False))):
        v, steps = run(search, f, 2.69)
        assert steps <= 40 and abs(f(v)[0] - target) <= 2.0**-21 * target


@pytest.mark.parametrize("root", [3.3e27, 2.5e6, -7.0e20])
def test_a_root_of_any_magnitude_within_a_bounded_number_of_steps(root):
    """f jumps across the target at a root far from the start and Newton's slope is useless:
    plateaus grow the step eightfold, and a bracket spanning orders of magnitude is halved in
    the order of the floats (at most 32 halvings), not in value (up to 280)."""
    target = 5.0

    def f(c: float):
        return (target + 3.0, 10.0) if c < root else (target - 3.0, 10.0)

    lo = -3.0e38
    host = threshold_search._HostSearch(lo, target, lo_known=True)
    v, steps = _run_host(host, f, 0.0)
    v32 = threshold_search._ceil32(root)
    assert v == v32 and not host.resolved and steps <= 100
    device = threshold_search._DeviceSearch(torch.tensor([lo], dtype=torch.float64),
                                            torch.tensor([target], dtype=torch.float64), lo_known=True)
    v, steps = _run_device(device, f, 0.0)
    assert v == v32 and not device.outcome()[0][2] and steps <= 100


def test_close_answers_stay_within_the_tolerance():
    """A Newton step from a close point is taken only where the count proves the sum stays
    within the tolerance; with a heavy tie just past it (the sum drops by 999 ulps at once) the
    evaluated point is the answer, and the allowance for floors lowers the upper tolerance."""
    target = 10.0
    tol = 2.0**-21 * target
    c = threshold_search._f32(0.49099093675613403)
    ulp = threshold_search._up32(c) - c
    f_c = target + 0.9 * tol

    search = threshold_search._HostSearch(0.0, target, lo_known=False, size=1000.0)
    v, done = search.step(c, f_c, 1000.0)  # a step of 0.9 tol / 1000 rounds up past c: f may fall 1000 ulps
    assert done and (v == c or f_c - 1000.0 * (v - c) >= target - tol)
    assert search.bound <= target + tol

    search = threshold_search._HostSearch(0.0, target, lo_known=False, size=1000.0)
    v, done = search.step(c, target - 0.5 * tol, 1.0)  # from the right: 999 ties may enter below c
    assert done and (v == c or target - 0.5 * tol + 1000.0 * (c - v) <= target + tol)
    assert v >= c - ulp

    search = threshold_search._HostSearch(0.0, target, lo_known=False, size=1000.0)
    v, done = search.step(c, f_c, 1000.0, held=0.5 * tol)  # upper tolerance 0.5 tol: not close
    assert not done and v > c
