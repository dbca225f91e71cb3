"""Video model pieces against independent references, and a tiny end-to-end run.

- The ViT and the tower converter are compared with Hugging Face ``transformers``' CLIP and SigLIP
  vision models on random checkpoints written by torch (both file formats).
- Adaptive pooling is compared with ``torch.nn.functional.adaptive_avg_pool2d``.
- Feeding embeddings: splicing a token's own embedding into a visual slot must give exactly the
  logits (and the generated text) of the plain token sequence, on mlx-lm's Llama (native
  ``input_embeddings``) and on our OpenELM (run block by block).
- A tiny run (tiny data, random encoder, tiny OpenELM decoder) lowers the loss, writes a model
  folder the assistant loads, and resumes an interrupted stage exactly.
"""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_elm.errors import VideoError
from mlx_elm.video import dataset as D
from mlx_elm.video.aligner import Aligner, AlignerConfig
from mlx_elm.video.decoder import EmbeddingDecoder
from mlx_elm.video.model import splice
from mlx_elm.video.vit import ViTConfig, VisionTransformer, adaptive_pool_matrix, load_encoder, save_encoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _tiny_llama(seed=0):
    from mlx_lm.models import llama

    mx.random.seed(seed)
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=320,
                           head_dim=16, rope_theta=10000.0, tie_word_embeddings=True)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def _tiny_openelm(seed=0):
    from mlx_elm.models.openelm import Model, ModelArgs

    mx.random.seed(seed)
    model = Model(ModelArgs(num_transformer_layers=2, model_dim=64, head_dim=16, vocab_size=320, num_gqa_groups=2,
                            ffn_dim_divisor=16, max_context_length=512))
    mx.eval(model.parameters())
    return model


# --- frame encoder -----------------------------------------------------------------------------


@pytest.mark.slow  # importing transformers alone takes ~10 s on the shared CPU
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_converted_tower_matches_transformers(kind, fmt, tmp_path):
    from convert.vision_tower import convert_vision_tower

    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    if kind == "clip":
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
    else:
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))
    hf.eval()
    with torch.no_grad():  # random LayerNorm affine too, so no parameter is left at a trivial value
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    if fmt == "bin":  # an older checkpoint: a zip pickle, names nested under vision_model.
        (src / "model.safetensors").unlink()
        torch.save({"vision_model." + k: v for k, v in hf.state_dict().items()}, src / "pytorch_model.bin")
    summary = convert_vision_tower(src, tmp_path / "enc", pool_grid=2)
    assert kind in summary
    enc = load_encoder(tmp_path / "enc")
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(x).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(enc(mx.array(x))), ref, atol=2e-5, rtol=1e-4)
    # pooled frame features: patch tokens (no class token) averaged over 2x2 cells
    pix = np.random.default_rng(1).integers(0, 255, size=(1, 32, 32, 3)).astype(np.uint8)
    norm = (pix / 255.0 - np.array(enc.cfg.image_mean)) / np.array(enc.cfg.image_std)
    with torch.no_grad():
        h = hf(pixel_values=torch.tensor(norm, dtype=torch.float32).permute(0, 3, 1, 2)).last_hidden_state
    patches = h[:, 1:] if kind == "clip" else h
    grid = patches.reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2).numpy()
    np.testing.assert_allclose(np.asarray(enc.features(mx.array(pix))), pooled, atol=2e-5, rtol=1e-4)


def test_converter_refuses_a_mismatched_or_unknown_tower(tmp_path):
    from convert.vision_tower import convert_vision_tower
    from mlx_elm.errors import ConversionError

    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                                                    num_hidden_layers=2, num_attention_heads=4,
                                                                    image_size=32, patch_size=8))
    hf.save_pretrained(tmp_path / "hf")
    cfg = (tmp_path / "hf" / "config.json").read_text()
    (tmp_path / "hf" / "config.json").write_text(cfg.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    with pytest.raises(ConversionError, match="missing encoder.layers.2"):
        convert_vision_tower(tmp_path / "hf", tmp_path / "out")
    (tmp_path / "hf" / "config.json").write_text(cfg.replace("clip_vision_model", "vit"))
    with pytest.raises(ConversionError, match="neither CLIP nor SigLIP"):
        convert_vision_tower(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("grid,out", [(8, 4), (14, 4), (7, 3), (4, 4)])
def test_adaptive_pool_matches_torch(grid, out):
    x = np.random.default_rng(grid).normal(size=(1, 5, grid, grid)).astype(np.float32)
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.tensor(x), out).flatten(2).numpy()[0]
    ours = adaptive_pool_matrix(grid, out) @ x[0].reshape(5, -1).T
    np.testing.assert_allclose(ours.T, ref, atol=1e-6)


def test_encoder_folder_roundtrip_and_errors(tmp_path):
    enc = VisionTransformer(ViTConfig(hidden_size=16, intermediate_size=32, num_layers=1))
    mx.eval(enc.parameters())
    save_encoder(tmp_path / "e", enc, dtype=mx.float32)
    back = load_encoder(tmp_path / "e")
    frames = mx.array(np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3)).astype(np.uint8))
    assert mx.allclose(back.features(frames), enc.features(frames)).item()
    assert back.features(frames).shape == (2, 16, 16)
    with pytest.raises(VideoError, match="not a frame-encoder folder"):
        load_encoder(tmp_path)


# --- aligner and decoder -----------------------------------------------------------------------


def test_resampler_gives_m_tokens_per_segment_at_the_decoder_scale():
    cfg = AlignerConfig(feature_dim=16, tokens_per_frame=4, frames_per_segment=3, dim=32, queries=5,
                        decoder_dim=48, output_rms=0.7)
    al = Aligner(cfg)
    mx.eval(al.parameters())
    feats = mx.random.normal((2, 3, 3, 4, 16))
    times = mx.broadcast_to(mx.arange(9, dtype=mx.float32).reshape(1, 3, 3), (2, 3, 3))
    out = al(feats, times)
    assert out.shape == (2, 3, 5, 48)
    rms = mx.sqrt(mx.mean(out * out, axis=-1))
    assert mx.allclose(rms, mx.full(rms.shape, 0.7), atol=1e-3).item()
    # absolute time matters: the same frames at other times give other tokens
    assert not mx.allclose(al(feats, times + 100.0), out, atol=1e-3).item()


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_openelm], ids=["llama-native", "openelm-blockwise"])
def test_spliced_token_embeddings_reproduce_plain_logits(make):
    base = make()
    dec = EmbeddingDecoder(base)
    tokens = mx.array([[5, 17, 42, 99, 3, 250, 7, 8]])
    ref = base(tokens)
    assert mx.allclose(dec(tokens), ref, atol=1e-5).item()
    slots = mx.array([[0, 0, 1, 1, 1, 0, 1, 0]], dtype=mx.float32)
    visual = dec.embed(tokens[:, mx.array([2, 3, 4, 6])])  # the tokens' own embeddings, in slot order
    index = mx.array([[0, 0, 0, 1, 2, 0, 3, 0]])
    placeholders = mx.where(slots > 0, 0, tokens)  # what the layout holds at visual slots
    emb = splice(dec.embed(placeholders), visual, index, slots)
    assert mx.allclose(dec(placeholders, input_embeddings=emb), ref, atol=1e-5).item()
    assert not mx.allclose(dec(placeholders), ref, atol=1e-3).item()


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_openelm], ids=["llama-native", "openelm-blockwise"])
def test_generation_with_embeddings_follows_the_token_path(make):
    """mlx-lm's generation loop (prefill in chunks, KV cache) fed embeddings picks the same tokens."""
    from mlx_lm.generate import generate_step

    base = make()
    dec = EmbeddingDecoder(base)
    prompt = mx.array([5, 17, 42, 99, 3, 250, 7, 8, 11, 12])
    plain = [int(t) for t, _ in generate_step(prompt, base, max_tokens=12, prefill_step_size=4)]
    emb = dec.embed(prompt[None])[0]
    spliced = [int(t) for t, _ in generate_step(prompt, dec, max_tokens=12, prefill_step_size=4, input_embeddings=emb)]
    assert spliced == plain and len(plain) == 12


# --- tiny end-to-end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory, spm_model_path):
    from mlx_elm.train.tiny import make_tiny_openelm

    root = tmp_path_factory.mktemp("video_e2e")
    D.make_dataset(root / "data", D.DataConfig(train=12, valid=3, id=4, comp=0, length_per_duration=0, durations=(8,),
                                               per_family_eval=2), splits=("train", "valid", "id"), progress=False)
    mx.random.seed(0)
    enc = VisionTransformer(ViTConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2))
    mx.eval(enc.parameters())
    save_encoder(root / "enc", enc)
    decoder = make_tiny_openelm(root / "dec", spm_model_path, max_context_length=2048)
    return root, decoder


def _cfg(root, decoder, out, **kw):
    from mlx_elm.video.layout import LayoutConfig
    from mlx_elm.video.training import StageConfig, VideoTrainConfig

    base = VideoTrainConfig(data=str(root / "data"), out=str(out), encoder=str(root / "enc"), decoder=str(decoder),
                            aligner=AlignerConfig(dim=32, heads=2, segment_layers=1, resampler_layers=1, queries=2),
                            layout=LayoutConfig(queries=2), stage0=StageConfig(6, 4, 3e-3, 1),
                            stage1=StageConfig(4, 4, 3e-3, 1), stage2=StageConfig(16, 4, 3e-3, 1), lora_rank=4,
                            lora_layers=2, text_replay=0.0, turns=3, progress=False)
    return replace(base, **kw)


@pytest.mark.slow
def test_tiny_run_lowers_the_loss_and_the_model_answers(tiny_world, tmp_path):
    from mlx_elm.generation import SamplingOptions
    from mlx_elm.video.assistant import VideoAssistant
    from mlx_elm.video.training import train_video_model

    root, decoder = tiny_world
    losses = {"stage0": [], "stage1": [], "stage2": []}
    folder = train_video_model(_cfg(root, decoder, tmp_path / "run"), log=lambda s: None,
                               on_step=lambda stage, step, loss, m: losses[stage].append(loss))
    assert [len(v) for v in losses.values()] == [6, 4, 16]
    s2 = losses["stage2"]
    assert np.mean(s2[-4:]) < 0.8 * np.mean(s2[:4])
    assert np.mean(losses["stage0"][-2:]) < losses["stage0"][0]
    for name in ("video_config.json", "aligner.safetensors", "encoder/encoder.json", "adapters/adapters.safetensors"):
        assert (folder / name).exists(), name
    assistant = VideoAssistant(folder, feature_cache=tmp_path / "cache")
    clip = root / "data" / "id" / "clips" / "000000.mp4"
    ans = assistant.ask(clip, "How many objects appear in the video?", options=SamplingOptions(max_tokens=4))
    assert isinstance(ans.text, str) and ans.seconds_to_first_token > 0 and not ans.features_cached
    assert ans.layout.counts["visual"] == 2 * 2
    again = assistant.ask(clip, "How many objects appear in the video?", options=SamplingOptions(max_tokens=4))
    assert again.features_cached and again.text == ans.text


def test_interrupted_stage_resumes_exactly(tiny_world, tmp_path):
    from mlx_elm.video.training import train_video_model

    root, decoder = tiny_world
    cfg = _cfg(root, decoder, tmp_path / "full", stages=("stage0",), stage0=replace(_cfg(root, decoder, "x").stage0, iters=6))
    full = []
    train_video_model(cfg, log=lambda s: None, on_step=lambda st, step, loss, m: full.append(loss))

    def interrupt(stage, step, loss, m):
        part.append(loss)
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    part = []
    cut = replace(cfg, out=str(tmp_path / "part"))
    with pytest.raises(KeyboardInterrupt):
        train_video_model(cut, log=lambda s: None, on_step=interrupt)
    train_video_model(cut, log=lambda s: None, on_step=lambda st, step, loss, m: part.append(loss))
    assert part == full
    a = mx.load(str(tmp_path / "full" / "stage0" / "aligner.safetensors"))
    b = mx.load(str(tmp_path / "part" / "stage0" / "aligner.safetensors"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    done = []  # a finished stage is not trained again
    train_video_model(cut, log=lambda s: None, on_step=lambda *a: done.append(a))
    assert done == []
