import numpy as np

from x2x_jax.editing.relevance import clip_and_normalize, relevance_from_eps


def numpy_reference(eps_ti, eps_i):
    out = []
    for a, b in zip(eps_ti, eps_i):
        m = np.abs(a - b).sum(-1)
        q1, q3 = np.percentile(m, [25, 75], method="midpoint")
        m = np.minimum(m, q3 + 1.5 * (q3 - q1))
        out.append((m - m.min()) / (m.max() - m.min()))
    return np.stack(out)


def test_relevance_matches_numpy_reference_with_outliers():
    rng = np.random.default_rng(0)
    eps_ti = rng.normal(size=(3, 16, 12, 4)).astype(np.float32)
    eps_i = rng.normal(size=(3, 16, 12, 4)).astype(np.float32)
    eps_ti[0, 3, 4] += 50.0  # an outlier the IQR clip must cut
    eps_ti[1, :4, :4] += 3.0
    got = np.asarray(relevance_from_eps(eps_ti, eps_i))
    want = numpy_reference(eps_ti, eps_i)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.shape == (3, 16, 12)
    assert got.min() == 0.0 and got.max() == 1.0
    # the clip actually bit: the outlier is not alone at 1
    assert (got[0] == 1.0).sum() > 1


def test_constant_map_gives_zeros_not_nan():
    out = np.asarray(clip_and_normalize(np.ones((2, 8, 8), np.float32)))
    assert np.isfinite(out).all() and (out == 0).all()
