"""Drawing batches in proportion to the weights: realised frequencies against the targets."""

from __future__ import annotations

import numpy as np
import pytest

from dwm.weighting.sampling import draw, stream_coverage


def toy():
    """8 candidates, 4 drawn; one candidate asks for 2 copies (n p = 2): a without-replacement draw must fail it."""
    p = np.array([8.0, 1, 1, 1, 1, 1, 1, 2])
    return p / p.sum(), 4


@pytest.mark.parametrize("how", ["systematic", "multinomial"])
def test_expected_counts_are_n_p(how):
    p, n = toy()
    rng = np.random.default_rng(0)
    reps = 20000
    counts = np.zeros(len(p))
    for _ in range(reps):
        idx = draw(p, n, rng, how)
        assert len(idx) == n
        counts += np.bincount(idx, minlength=len(p))
    want = n * p
    se = np.sqrt(n * p * (1 + 1e-9) / reps)  # a multinomial count's standard error bounds both draws'
    assert np.all(np.abs(counts / reps - want) < 5 * se + 1e-3), (counts / reps, want)


def test_systematic_counts_are_floor_or_ceil_of_n_p():
    p, n = toy()
    rng = np.random.default_rng(1)
    for _ in range(2000):
        c = np.bincount(draw(p, n, rng, "systematic"), minlength=len(p))
        assert np.all((c == np.floor(n * p)) | (c == np.ceil(n * p)))
        assert c[0] == 2  # n p_0 = 2 exactly: always two copies


def test_gumbel_topk_is_capped_and_flatter():
    """The without-replacement draw trains the heavy candidate at most once: its share is 1/4, not p_0 = 1/2."""
    p, n = toy()
    rng = np.random.default_rng(2)
    share = np.mean([np.sum(draw(p, n, rng, "gumbel") == 0) / n for _ in range(5000)])
    assert share <= 0.25 + 1e-12 and abs(share - p[0]) > 0.2


def test_stream_coverage_by_hand():
    """4 candidates a sample over a pool the budget covers once: offered 4 times, trained Binomial(4, 1/4)."""
    c = stream_coverage(pool=1000, steps=10, batch=100, candidates=4)
    assert c["passes"] == pytest.approx(4.0) and c["expected_trainings"] == pytest.approx(1.0)
    assert c["never"] == pytest.approx(1000 * 0.75 ** 4)
    assert c["twice_or_more"] == pytest.approx(1000 * (1 - 0.75 ** 4 - 4 * 0.25 * 0.75 ** 3))


def test_bad_weights_are_refused():
    rng = np.random.default_rng(0)
    for bad in ([], [0.0, 0.0], [1.0, -1.0], [np.nan, 1.0]):
        with pytest.raises(ValueError):
            draw(np.array(bad), 1, rng)
