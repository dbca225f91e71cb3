"""Efficiency against video length: feature extraction, time to first token, tokens, peak memory."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, List, Sequence

import mlx.core as mx
import numpy as np

from mlx_elm.generation import SamplingOptions
from mlx_elm.video import synthetic as S
from mlx_elm.video.features import FeatureCache
from mlx_elm.video.io import write_mp4


def measure_efficiency(assistant, durations: Sequence[float], log: Callable[[str], None] = print,
                       seed: int = 0) -> List[dict]:
    """For each duration: a synthetic clip is written, its features computed with a cold cache,
    then one question is answered from the warm cache (time to first token, peak memory)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlx-elm-video-eff-") as tmp:
        tmp = Path(tmp)
        for d in durations:
            rng = np.random.default_rng([seed, int(d)])
            scene = S.sample_long_scene(rng, float(d), 0.5, 3.0)
            clip = write_mp4(tmp / f"clip_{int(d)}.mp4", S.render(scene, 4.0, assistant.encoder.cfg.image_size), 4.0)
            cache = FeatureCache(assistant.encoder, assistant.cfg.fps, tmp / "cache")
            assistant.cache = cache
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            cache.get(clip, max_seconds=float(d) + 60)
            t_feat = time.perf_counter() - t0
            mem_feat = mx.get_peak_memory() / 2**20
            mx.reset_peak_memory()
            question = f"Which way does the {S.object_name(scene.objects[0])} move?"
            ans = assistant.ask(clip, question, options=SamplingOptions(max_tokens=4), max_seconds=float(d) + 60)
            row = {"duration": d, "segments": ans.plan.num_segments, "segment_seconds": ans.plan.segment_seconds,
                   "visual_tokens": ans.layout.counts["visual"], "prompt_tokens": len(ans.layout.tokens),
                   "features_seconds": t_feat, "features_peak_mb": mem_feat,
                   "ttft_seconds": ans.seconds_to_first_token, "peak_mb": mx.get_peak_memory() / 2**20,
                   "prompt_tps": ans.stats.prompt_tps}
            rows.append(row)
            log(f"efficiency {d:.0f}s: {row['visual_tokens']} visual / {row['prompt_tokens']} prompt tokens, "
                f"features {t_feat:.1f}s, ttft {row['ttft_seconds']:.2f}s, peak {row['peak_mb']:.0f} MB")
    return rows
