"""HiFi-GAN converter: a tiny random generator in the public PyTorch layout, written with torch here,
read through the safe pickle reader and compared with a PyTorch reference forward."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as F

from convert.hifigan import convert_hifigan
from mlx_elm.errors import ConversionError
from mlx_elm.speech import files
from mlx_elm.speech.hifigan import Generator, HiFiGANArgs


def _pad(k, d):
    return (k * d - d) // 2


class TorchRes1(tnn.Module):
    def __init__(self, ch, k, ds, wn):
        super().__init__()
        self.convs1 = tnn.ModuleList([wn(tnn.Conv1d(ch, ch, k, 1, dilation=d, padding=_pad(k, d))) for d in ds])
        self.convs2 = tnn.ModuleList([wn(tnn.Conv1d(ch, ch, k, 1, dilation=1, padding=_pad(k, 1))) for _ in ds])

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1)) + x
        return x


class TorchRes2(tnn.Module):
    def __init__(self, ch, k, ds, wn):
        super().__init__()
        self.convs = tnn.ModuleList([wn(tnn.Conv1d(ch, ch, k, 1, dilation=d, padding=_pad(k, d))) for d in ds])

    def forward(self, x):
        for c in self.convs:
            x = c(F.leaky_relu(x, 0.1)) + x
        return x


class TorchGenerator(tnn.Module):
    """The HiFi-GAN generator's forward, written from the paper's reference code semantics."""

    def __init__(self, h, wn):
        super().__init__()
        self.h = h
        ch0 = h["upsample_initial_channel"]
        self.conv_pre = wn(tnn.Conv1d(h["num_mels"], ch0, 7, 1, padding=3))
        self.ups = tnn.ModuleList([wn(tnn.ConvTranspose1d(ch0 // 2**i, ch0 // 2 ** (i + 1), k, u, padding=(k - u) // 2))
                                   for i, (u, k) in enumerate(zip(h["upsample_rates"], h["upsample_kernel_sizes"]))])
        block = TorchRes1 if h["resblock"] == "1" else TorchRes2
        self.resblocks = tnn.ModuleList([block(ch0 // 2 ** (i + 1), k, d, wn) for i in range(len(self.ups))
                                         for k, d in zip(h["resblock_kernel_sizes"], h["resblock_dilation_sizes"])])
        self.conv_post = wn(tnn.Conv1d(ch0 // 2 ** len(self.ups), 1, 7, 1, padding=3))

    def forward(self, x):
        x = self.conv_pre(x)
        nk = len(self.h["resblock_kernel_sizes"])
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, 0.1))
            x = sum(self.resblocks[i * nk + j](x) for j in range(nk)) / nk
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


def _config(resblock):
    dil = [[1, 3, 5], [1, 2, 3]] if resblock == "1" else [[1, 3], [1, 2]]
    return {"num_mels": 80, "sampling_rate": 22050, "upsample_rates": [4, 2], "upsample_kernel_sizes": [8, 4],
            "upsample_initial_channel": 16, "resblock": resblock, "resblock_kernel_sizes": [3, 5],
            "resblock_dilation_sizes": dil}


@pytest.mark.parametrize("resblock,norm", [("1", "old"), ("2", "parametrizations")])
def test_converted_generator_matches_the_torch_reference(tmp_path, resblock, norm):
    torch.manual_seed(0)
    wn = tnn.utils.weight_norm if norm == "old" else tnn.utils.parametrizations.weight_norm
    h = _config(resblock)
    g = TorchGenerator(h, wn)
    with torch.no_grad():  # make g differ from ||v|| so folding matters
        for name, p in g.named_parameters():
            if name.endswith(("weight_g", "original0")):
                p.mul_(torch.rand_like(p) + 0.5)
    sd = g.state_dict()
    assert any(k.endswith(("weight_g", "original0")) for k in sd)
    torch.save({"generator": sd}, tmp_path / "g_00000001")
    (tmp_path / "config.json").write_text(json.dumps(h))
    out = convert_hifigan(tmp_path / "g_00000001", tmp_path / "config.json", tmp_path / "mlx")
    model = files.load(out, lambda c: Generator(HiFiGANArgs.from_dict(c)), "vocoder")
    mel = np.random.default_rng(0).normal(size=(2, 80, 12)).astype(np.float32)
    with torch.no_grad():
        ref = g(torch.tensor(mel))[:, 0].numpy()
    got = np.array(model(mx.array(mel.transpose(0, 2, 1))))
    assert got.shape == ref.shape == (2, 12 * model.hop)
    np.testing.assert_allclose(got, ref, atol=1e-4)


pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")


def test_a_mismatched_config_is_refused_in_one_line(tmp_path):
    torch.manual_seed(0)
    h = _config("1")
    torch.save({"generator": TorchGenerator(h, tnn.utils.weight_norm).state_dict()}, tmp_path / "g")
    h["upsample_initial_channel"] = 32
    (tmp_path / "config.json").write_text(json.dumps(h))
    with pytest.raises(ConversionError, match="config") as e:
        convert_hifigan(tmp_path / "g", tmp_path / "config.json", tmp_path / "mlx")
    assert "\n" not in str(e.value)
    torch.save({"discriminator": {}}, tmp_path / "d")
    with pytest.raises(ConversionError, match="generator"):
        convert_hifigan(tmp_path / "d", tmp_path / "config.json", tmp_path / "mlx2")


def test_speak_through_a_converted_vocoder(tmp_path):
    from mlx_elm.speech import pipeline

    if not (files.DEFAULT_MODEL / "model.safetensors").exists():
        pytest.skip("the shipped speech model is not in this checkout")
    torch.manual_seed(0)
    h = dict(_config("2"), upsample_rates=[8, 8, 4], upsample_kernel_sizes=[16, 16, 8])  # hop 256
    torch.save({"generator": TorchGenerator(h, tnn.utils.weight_norm).state_dict()}, tmp_path / "g")
    (tmp_path / "config.json").write_text(json.dumps(h))
    folder = convert_hifigan(tmp_path / "g", tmp_path / "config.json", tmp_path / "voc")
    r = pipeline.Synthesizer(vocoder=folder)("Hello there.", steps=1)
    assert len(r.samples) == int(r.durations.sum()) * 256 and np.abs(r.samples).max() <= 1
