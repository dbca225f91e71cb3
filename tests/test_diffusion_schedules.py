"""Schedules: published AYS arrays carried exactly, interpolation, hand-crafted formulas, VP conversions."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_elm.diffusion import schedules as S
from mlx_elm.errors import DiffusionError

# NVIDIA's table (diffusers issue #7760), typed in independently of the library constants.
TABLE = {
    "sd15": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
    "deepfloyd-if": [160.41, 8.081, 3.315, 1.885, 1.207, 0.785, 0.553, 0.293, 0.186, 0.030, 0.006],
    "svd": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}
# ComfyUI nodes_align_your_steps.py: sigma evaluated exactly at the published integer timesteps.
COMFY_SD1 = [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
             0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582]
COMFY_SDXL = [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
              0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582]


def test_published_arrays_exact_with_source():
    for key, vals in TABLE.items():
        p = S.PUBLISHED_AYS[key]
        assert list(p.sigmas) == vals
        assert "2404.14507" in p.source and "#7760" in p.source
        assert np.array_equal(np.array(S.published(key, 10)), np.array(vals, dtype=np.float32))
    assert S.PUBLISHED_AYS["sd15"].timesteps == (999, 850, 736, 645, 545, 455, 343, 233, 124, 24, 0)
    assert S.PUBLISHED_AYS["sdxl"].timesteps == (999, 845, 730, 587, 443, 310, 193, 116, 53, 13, 0)
    assert S.PUBLISHED_AYS["svd"].timesteps is None


def test_timestep_sigma_conversion_matches_comfyui():
    ac = S.sd_alphas_cumprod()
    for key, comfy in (("sd15", COMFY_SD1), ("sdxl", COMFY_SDXL)):
        ts = mx.array(S.PUBLISHED_AYS[key].timesteps)
        sig = np.array(S.timesteps_to_sigmas(ts, ac))
        np.testing.assert_allclose(sig, comfy, rtol=2e-5)
        # the published sigma column is the continuous optimum: its rounding gives the same indices
        back = np.array(S.sigmas_to_timesteps(mx.array(comfy), ac))
        assert back.tolist() == list(S.PUBLISHED_AYS[key].timesteps)
        np.testing.assert_allclose(sig, TABLE[key], atol=2e-3, rtol=0.02)


def test_loglinear_interp_roundtrip_and_midpoints():
    for key in TABLE:
        s = S.published(key, 10)
        np.testing.assert_allclose(np.array(S.loglinear_interp(s, 10)), np.array(s), rtol=1e-6)
    s = np.array(COMFY_SD1)
    s20 = np.array(S.loglinear_interp(mx.array(s), 20))
    np.testing.assert_allclose(s20[::2], s, rtol=1e-5)
    np.testing.assert_allclose(s20[1::2], np.sqrt(s[:-1] * s[1:]), rtol=1e-5)
    np.testing.assert_allclose(s20[:4], [14.6146, 9.7275, 6.4746, 5.0016], rtol=1e-4)
    np.testing.assert_allclose(s20[-2:], [0.0665, 0.0292], rtol=2e-3)
    s5 = np.array(S.loglinear_interp(mx.array(s), 5))
    assert s5[0] == pytest.approx(s[0], rel=1e-6) and s5[-1] == pytest.approx(s[-1], rel=1e-5)
    np.testing.assert_allclose(s5[1:-1], s[2:-1:2], rtol=1e-5)  # every other level


def test_handcrafted_match_reference_numbers():
    lo, hi = COMFY_SD1[-1], COMFY_SD1[0]
    np.testing.assert_allclose(np.array(S.karras(9, lo, hi)),
                               [14.61, 9.10, 5.48, 3.17, 1.75, 0.91, 0.45, 0.20, 0.08, 0.029], atol=6e-3)
    np.testing.assert_allclose(np.array(S.kl_optimal(9, lo, hi)),
                               [14.61, 4.23, 2.39, 1.60, 1.13, 0.82, 0.57, 0.37, 0.20, 0.029], atol=6e-3)
    # NumPy reference of the Karras formula
    n, rho = 7, 7.0
    ref = (80 ** (1 / rho) + np.arange(n + 1) / n * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    np.testing.assert_allclose(np.array(S.karras(n)), ref, rtol=1e-5)
    np.testing.assert_allclose(np.array(S.logsnr_uniform(4)), np.geomspace(80, 0.002, 5), rtol=1e-5)
    tu = np.array(S.time_uniform(10))
    assert tu[0] == pytest.approx(80) and tu[-1] == pytest.approx(0.002) and np.all(np.diff(tu) < 0)
    # VP time-uniform: sqrt(log(1 + sigma^2)) quadratic in t -> check against the VP map in NumPy
    t = (-0.1 + np.sqrt(0.01 + 2 * 19.9 * np.log1p(tu**2))) / 19.9
    np.testing.assert_allclose(np.diff(t), np.diff(t)[0], rtol=1e-3)


def test_schedule_errors():
    with pytest.raises(DiffusionError, match="unknown schedule"):
        S.get_schedule("cosine-ish", 10)
    with pytest.raises(DiffusionError):
        S.karras(0)
    with pytest.raises(DiffusionError):
        S.karras(10, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(DiffusionError, match="decreasing"):
        S.validate(mx.array([1.0, 2.0, 0.5]))
    assert S.get_schedule("ays-sdxl", 10).shape == (11,)
    assert math.isclose(float(S.get_schedule("ays-svd", 20)[0].item()), 700.0, rel_tol=1e-6)
