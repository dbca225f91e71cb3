"""torchscale MH-MoE / SMoE checkpoints → OpenELM-MoE folders, checked against the PyTorch source."""

from __future__ import annotations

import math
import struct
import zipfile

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from convert import convert  # noqa: E402
from convert.torchscale_reference import TorchscaleMoEReference  # noqa: E402
from mlx_elm.errors import ConversionError  # noqa: E402
from mlx_elm.loading import load_model  # noqa: E402

D, HEADS, VOCAB, LAYERS, DENSE_FFN = 32, 4, 50, 4, 40


def torchscale_state_dict(moe_heads=2, experts=4, expert_ffn=24, router="linear", head_merge=True, untied=False,
                          seed=0) -> dict:
    """A random decoder in the official layout (fairseq's ``decoder.`` prefix), MoE in blocks 2 and 4."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.2: torch.randn(*s, generator=g) * scale  # noqa: E731
    sub = D // moe_heads
    sd = {"decoder.embed_tokens.weight": r(VOCAB, D, scale=0.5), "decoder.layer_norm.weight": 1 + r(D, scale=0.1)}
    if untied:
        sd["decoder.output_projection.weight"] = r(VOCAB, D, scale=0.5)
    for i in range(LAYERS):
        p = f"decoder.layers.{i}."
        for n in ("q", "k", "v", "out"):
            sd[p + f"self_attn.{n}_proj.weight"] = r(D, D)
        sd[p + "self_attn_layer_norm.weight"] = 1 + r(D, scale=0.1)
        sd[p + "final_layer_norm.weight"] = 1 + r(D, scale=0.1)
        if (i + 1) % 2:
            for fc, shape in (("fc1", (DENSE_FFN, D)), ("fc3", (DENSE_FFN, D)), ("fc2", (D, DENSE_FFN))):
                sd[p + f"ffn.{fc}.weight"] = r(*shape)
            continue
        m = p + "moe_layer."
        if router == "linear":
            sd[m + "gate.wg.weight"] = r(experts, sub, scale=2.0)  # sharp routing: no near-ties
        else:
            sd[m + "gate.wg_reduction.weight"] = r(16, sub, scale=2.0)
            sd[m + "gate.wg"] = r(experts, 16, scale=1.0)
        for e in range(experts):
            for fc, shape in (("fc1", (expert_ffn, sub)), ("fc3", (expert_ffn, sub)), ("fc2", (sub, expert_ffn))):
                sd[m + f"experts.{e}.{fc}.weight"] = r(*shape)
        if head_merge:
            for n in ("head_proj", "merge_proj"):
                sd[m + f"{n}.weight"], sd[m + f"{n}.bias"] = r(D, D), r(D, scale=0.05)
    return sd


def save(sd: dict, path, wrap=True):
    torch.save({"model": sd} if wrap else sd, path)
    return path


def reference_logits(sd, tokens, **hp):
    weights = {k.removeprefix("decoder."): v.numpy() for k, v in sd.items()}
    return TorchscaleMoEReference(weights, dict(dict(heads=HEADS, top_k=1, norm_eps=1e-5), **hp))(tokens)


def mlx_logits(folder, tokens):
    model = load_model(folder, representation="float32")[0]
    return np.array(model(mx.array(tokens)))


TOKENS = np.array([[1, 4, 9, 16, 25, 36, 49, 2, 3, 5, 8, 13]])


@pytest.mark.parametrize("top_k,cf", [(1, 0.0), (2, 0.0), (2, 1.0)])
def test_mhmoe_checkpoint_converts_and_matches_its_pytorch_source(tmp_path, top_k, cf):
    sd = torchscale_state_dict()
    src = save(sd, tmp_path / "mhmoe.pt")
    report = convert(src, tmp_path / "out", format="auto", dtype="float32", verify=True,
                     moe_options=dict(heads=HEADS, top_k=top_k, capacity_factor=cf))
    assert report.max_logit_diff is not None and report.max_logit_diff <= report.tolerance
    want = reference_logits(sd, TOKENS, top_k=top_k, capacity_factor=cf)
    np.testing.assert_allclose(mlx_logits(tmp_path / "out", TOKENS), want, rtol=1e-4, atol=1e-4)
    import json

    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["model_type"], cfg["moe_type"], cfg["moe_heads"], cfg["num_experts"], cfg["moe_every"]) == \
        ("openelm_moe", "mhmoe", 2, 4, 2)


def test_smoe_xmoe_router_interleaved_rope_untied_scaled_embedding(tmp_path):
    sd = torchscale_state_dict(moe_heads=1, experts=3, router="xmoe", head_merge=False, untied=True, seed=1)
    src = save(sd, tmp_path / "smoe.pt", wrap=False)
    hp = dict(rope="interleaved", embed_scale=math.sqrt(D))
    report = convert(src, tmp_path / "out", format="torchscale-moe", dtype="float32", verify=True,
                     moe_options=dict(heads=HEADS, **hp))
    assert report.max_logit_diff <= report.tolerance
    np.testing.assert_allclose(mlx_logits(tmp_path / "out", TOKENS), reference_logits(sd, TOKENS, **hp),
                               rtol=1e-4, atol=1e-4)
    # the interleaved layout really differs: reading it as half-split gives other logits
    other = reference_logits(sd, TOKENS, rope="half", embed_scale=math.sqrt(D))
    assert np.abs(other - reference_logits(sd, TOKENS, **hp)).max() > 1e-3


def test_quantized_conversion_keeps_routers_dense_and_stays_close(tmp_path):
    sd = torchscale_state_dict(moe_heads=1, expert_ffn=32, head_merge=False)  # widths divisible by the group
    report = convert(save(sd, tmp_path / "m.pt"), tmp_path / "q", format="torchscale-moe", dtype="float32",
                     quantize=True, bits=8, group_size=32, verify=True, moe_options=dict(heads=HEADS))
    assert report.max_logit_diff <= report.tolerance  # the float mapping
    assert any("8-bit folder" in n for n in report.notes)
    model = load_model(tmp_path / "q", representation="as-stored")[0]
    kinds = {p: type(m).__name__ for p, m in model.named_modules()}
    assert kinds["transformer.layers.1.moe.router"] == "Linear"
    assert kinds["transformer.layers.1.moe.experts.up_proj"] == "QuantizedSwitchLinear"
    assert kinds["transformer.layers.1.moe.experts.down_proj"] == "QuantizedSwitchLinear"
    got = np.array(model(mx.array(TOKENS)))
    want = reference_logits(sd, TOKENS)
    # 8-bit weights move the router inputs slightly, which can flip a near-tie expert choice at a few
    # positions; the bulk of the logits must stay close
    assert np.median(np.abs(got - want)) < 0.02 * np.abs(want).max()


def test_a_wrong_mapping_fails_verify_and_writes_nothing(tmp_path, monkeypatch):
    from convert import torchscale_moe

    original = torchscale_moe.map_weights

    def swapped_gate_and_up(*a, **kw):  # the classic SwiGLU mistake: fc1 and fc3 exchanged
        w = original(*a, **kw)
        k = "transformer.layers.1.moe.moe.experts."
        w[k + "gate_proj.weight"], w[k + "up_proj.weight"] = w[k + "up_proj.weight"], w[k + "gate_proj.weight"]
        return w

    monkeypatch.setattr(torchscale_moe, "map_weights", swapped_gate_and_up)
    src = save(torchscale_state_dict(), tmp_path / "m.pt")
    with pytest.raises(ConversionError, match="--verify failed"):
        convert(src, tmp_path / "out", format="torchscale-moe", dtype="float32", verify=True,
                moe_options=dict(heads=HEADS))
    assert not (tmp_path / "out").exists()


def test_unsupported_tensors_and_bad_names_are_refused(tmp_path):
    sd = torchscale_state_dict()
    sd["decoder.layers.0.self_attn.q_proj.bias"] = torch.zeros(D)
    with pytest.raises(ConversionError, match="unsupported tensor"):
        convert(save(sd, tmp_path / "b.pt"), tmp_path / "out", format="torchscale-moe",
                moe_options=dict(heads=HEADS))
    sd = {k.replace("moe_layer.", "moe."): v for k, v in torchscale_state_dict().items()}
    with pytest.raises(ConversionError):
        convert(save(sd, tmp_path / "c.pt"), tmp_path / "out2", format="torchscale-moe",
                moe_options=dict(heads=HEADS))
    report = convert(tmp_path / "c.pt", tmp_path / "out3", format="torchscale-moe", dtype="float32",
                     moe_options=dict(heads=HEADS, renames=[(".moe.", ".moe_layer.")]))
    assert report.parameters > 0


def test_convert_cli_with_verify(tmp_path, cli):
    src = save(torchscale_state_dict(), tmp_path / "m.pt")
    res = cli("convert", src, tmp_path / "out", "--format", "torchscale-moe", "--heads", HEADS, "--top-k", 2,
              "--dtype", "float32", "--verify", "--quiet")
    assert res.code == 0, res.stderr
    assert "verify max|Δlogit|" in res.stdout
    bad = cli("convert", src, tmp_path / "out2", "--format", "torchscale-moe", "--rope", "sideways")
    assert bad.code == 1 and len(bad.error_lines) == 1 and "--rope" in bad.stderr


def test_crc_check_reaches_the_torchscale_path(tmp_path, cli):
    """A flipped byte in a tensor's zip entry is refused by default; --no-check-crc reads it as is."""
    src = save(torchscale_state_dict(), tmp_path / "m.pt")
    with zipfile.ZipFile(src) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(src.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)  # the local header's own
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x01  # the low mantissa bit of one float: still finite
    src.write_bytes(bytes(raw))
    args = ["--format", "torchscale-moe", "--heads", HEADS, "--top-k", 2, "--dtype", "float32", "--quiet"]
    bad = cli("convert", src, tmp_path / "o1", *args)
    assert bad.code == 1 and len(bad.error_lines) == 1 and "crc" in bad.stderr.lower(), bad.stderr
    assert not (tmp_path / "o1").exists()
    ok = cli("convert", src, tmp_path / "o2", *args, "--no-check-crc")
    assert ok.code == 0, ok.stderr
