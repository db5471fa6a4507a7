"""Schedule values at their boundaries and in between."""

import pytest

from probmask.schedules import CubicBudget, TemperatureSchedule


def test_cubic_budget_boundaries():
    b = CubicBudget(target=0.01)
    epochs = 100
    assert b(0, epochs) == 1.0
    assert b(15.9, epochs) == 1.0
    assert b(16, epochs) == pytest.approx(1.0)
    assert b(60, epochs) == pytest.approx(0.01)
    assert b(99, epochs) == pytest.approx(0.01)
    mid = b(38, epochs)  # halfway between ts=16 and te=60
    assert mid == pytest.approx(0.01 + 0.99 * 0.5**3)
    values = [b(e / 10, epochs) for e in range(1000)]
    assert all(x >= y for x, y in zip(values, values[1:]))  # never increases


def test_cubic_budget_custom_points_and_errors():
    b = CubicBudget(target=0.5, start=0.0, end=0.5)
    assert b(0, 10) == 1.0 and b(5, 10) == 0.5
    with pytest.raises(ValueError, match="target keep ratio"):
        CubicBudget(target=0.0)
    with pytest.raises(ValueError, match="start <= end"):
        CubicBudget(target=0.1, start=0.7, end=0.6)
    with pytest.raises(ValueError, match="num_epochs"):
        b(0, 0)


def test_temperature_boundaries():
    t = TemperatureSchedule()
    assert t(0, 300) == pytest.approx(1.0)
    assert t(300, 300) == pytest.approx(1 / 0.03)
    assert t(150, 300) == pytest.approx(1 / (0.97 * 0.5 + 0.03))
    assert t(400, 300) == pytest.approx(1 / 0.03)  # finetune epochs past the end stay at the end
    with pytest.raises(ValueError, match="final temperature"):
        TemperatureSchedule(final=0.0)
