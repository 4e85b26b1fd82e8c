import numpy as np
import pytest

from jaxinterp.train import make_optimizer, make_schedule


def values(s, n):
    return np.array([float(s(i)) for i in range(n)])


def test_quarter_cosine_endpoints():
    v = values(make_schedule("quarter_cosine", 2.0, 11), 11)
    assert v[0] == pytest.approx(2.0)
    assert v[-1] == pytest.approx(0.0, abs=1e-6)
    assert v[5] == pytest.approx(2.0 * np.cos(np.pi / 4), rel=1e-6)


def test_warmup_starts_at_zero_then_schedule():
    s = make_schedule("linear", 1.0, 20, warmup_frac=0.25)  # W = 5, S' = 15
    v = values(s, 20)
    assert v[0] == 0.0
    assert v[1] == pytest.approx(0.2)
    assert v[5] == pytest.approx(1.0)
    assert v[19] == pytest.approx(1.0 - 14 / 15, rel=1e-5)


def test_half_cosine_and_exponential_and_step():
    v = values(make_schedule("half_cosine", 1.0, 5, final_frac=0.1), 5)
    assert v[0] == pytest.approx(1.0) and v[-1] == pytest.approx(0.1)
    v = values(make_schedule("exponential", 1.0, 10, halflife=2.0), 10)
    assert v[2] == pytest.approx(0.5) and v[4] == pytest.approx(0.25)
    v = values(make_schedule("step", 1.0, 40, gamma=0.5, every=2, steps_per_epoch=5), 40)
    assert v[9] == pytest.approx(1.0) and v[10] == pytest.approx(0.5)
    assert v[20] == pytest.approx(0.25)
    assert values(make_schedule("quarter_cosine", 3.0, 1), 1)[0] == pytest.approx(3.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="cosine", lr=1.0, total_steps=10), "name"),
    (dict(name="linear", lr=1.0, total_steps=0), "total_steps"),
    (dict(name="linear", lr=1.0, total_steps=10, warmup_frac=1.0), "warmup_frac"),
    (dict(name="exponential", lr=1.0, total_steps=10), "halflife"),
])
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(**kwargs)


def test_optimizer_factory_rejects_unknown():
    with pytest.raises(ValueError, match="make_optimizer: expected name"):
        make_optimizer("lion", 1e-3, 10)
