"""Diffusion samplers and Align Your Steps (AYS) schedules in MLX.

- :mod:`schedules`: Karras/EDM, log-SNR, time-uniform, kl-optimal, published AYS arrays,
  log-linear interpolation, sigma <-> timestep for SD-style VP models.
- :mod:`sampling`: Euler, Heun, DPM-Solver++(2M), stochastic DDIM, consistency multistep.
- :mod:`toy`: Gaussian mixtures with exact denoisers, 2D datasets, a trained MLP denoiser.
- :mod:`klub` / :mod:`ays`: KLUB estimator and the schedule optimiser.
- :mod:`metrics`: KL(q||p), KL(p||q), sliced Wasserstein, MMD.
"""

from mlx_elm.diffusion.ays import AYSConfig, AYSResult, optimize, refine
from mlx_elm.diffusion.klub import KLUBConfig, KLUBEstimator, klub_gaussian
from mlx_elm.diffusion.sampling import (
    SAMPLERS,
    CountNFE,
    consistency_function,
    sample,
    sample_consistency,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from mlx_elm.diffusion.schedules import (
    HAND_CRAFTED,
    PUBLISHED_AYS,
    get_schedule,
    karras,
    kl_optimal,
    loglinear_interp,
    logsnr_uniform,
    published,
    sigma_uniform,
    sigmas_to_timesteps,
    time_uniform,
    timesteps_to_sigmas,
)
from mlx_elm.diffusion.toy import GMM, MLPDenoiser, get_dataset

__all__ = [
    "AYSConfig", "AYSResult", "optimize", "refine",
    "KLUBConfig", "KLUBEstimator", "klub_gaussian",
    "SAMPLERS", "CountNFE", "consistency_function", "sample", "sample_consistency",
    "sample_dpmpp_2m", "sample_euler", "sample_euler_ancestral", "sample_heun",
    "HAND_CRAFTED", "PUBLISHED_AYS", "get_schedule", "karras", "kl_optimal", "loglinear_interp",
    "logsnr_uniform", "published", "sigma_uniform", "sigmas_to_timesteps", "time_uniform",
    "timesteps_to_sigmas",
    "GMM", "MLPDenoiser", "get_dataset",
]
