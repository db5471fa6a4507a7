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
    assert bool(done_t.all()) and abs(float(device.round_up(nxt_t)) - root) < 1e-12
