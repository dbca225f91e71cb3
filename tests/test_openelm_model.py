"""OpenELM geometry, parameter counts, and parity with an independent NumPy forward pass."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from mlx_elm.models.openelm import Model, ModelArgs, count_parameters, make_divisible, preset
from openelm_fixtures import numpy_weights, random_model, tiny_args
from reference_openelm import forward as numpy_forward

PARAMS = {"OpenELM-270M": 271_527_168, "OpenELM-450M": 457_179_136,
          "OpenELM-1_1B": 1_079_891_456, "OpenELM-3B": 3_036_647_424}

FFN_DIMS = {
    "OpenELM-270M": "768 1024 1280 1536 1792 2048 2560 2816 3072 3328 3584 3840 4352 4608 4864 5120",
    "OpenELM-1_1B": "1024 1280 1536 1792 2048 2304 2560 2816 3072 3328 3584 3840 4096 4608 4608 5120 "
                    "5376 5632 5888 6144 6400 6656 6912 7168 7424 7680 7936 8192",
    "OpenELM-3B": "1536 1792 2048 2560 2816 3072 3328 3584 4096 4352 4608 4864 5120 5632 5888 6144 6400 "
                  "6656 7168 7424 7680 7936 8192 8704 8960 9216 9472 9728 10240 10496 10752 11008 11264 "
                  "11776 12032 12288",
}
QUERY_HEADS = {  # run-length: (heads, count)
    "OpenELM-270M": [(12, 5), (16, 7), (20, 4)],
    "OpenELM-450M": [(12, 3), (16, 7), (20, 6), (24, 4)],
    "OpenELM-1_1B": [(16, 3), (20, 7), (24, 8), (28, 6), (32, 4)],
    "OpenELM-3B": [(12, 4), (16, 14), (20, 12), (24, 6)],
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts_without_allocating(name):
    args = preset(name)
    assert count_parameters(args) == PARAMS[name]
    # MLX arrays are lazy: building the module allocates nothing until evaluated.
    lazy = Model(args)
    assert sum(v.size for _, v in tree_flatten(lazy.parameters())) == PARAMS[name]


@pytest.mark.parametrize("name", list(QUERY_HEADS))
def test_layer_wise_geometry(name):
    args = preset(name + "-Instruct")
    expected = [h for h, n in QUERY_HEADS[name] for _ in range(n)]
    assert args.num_query_heads == expected
    assert args.num_kv_heads == [h // 4 for h in expected]
    if name in FFN_DIMS:
        assert args.ffn_dims == [int(x) for x in FFN_DIMS[name].split()]


def test_hf_multipliers_are_two_decimal_rounded():
    assert preset("270m").ffn_multipliers == [0.5, 0.73, 0.97, 1.2, 1.43, 1.67, 1.9, 2.13, 2.37,
                                              2.6, 2.83, 3.07, 3.3, 3.53, 3.77, 4.0]


def test_make_divisible_never_loses_more_than_ten_percent():
    for v in np.linspace(1, 5000, 997):
        r = make_divisible(v, 256)
        assert r % 256 == 0 and r >= 0.9 * v


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown OpenELM preset"):
        preset("OpenELM-7B")


def test_config_options_are_honoured():
    args = tiny_args(normalize_qk_projections=False, share_input_output_layers=False,
                     rope_freq_constant=500000.0, rms_norm_eps=1e-5)
    model = Model(args)
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert "lm_head.weight" in names and not any("q_norm" in k for k in names)
    assert model.layers[0].attn.rope.base == 500000.0
    assert count_parameters(args) == sum(v.size for _, v in tree_flatten(model.parameters()))


@pytest.fixture(scope="module")
def tiny():
    args = tiny_args()
    assert args.num_query_heads == [4, 8, 8, 8] and args.num_kv_heads == [1, 2, 2, 2]
    return random_model(args)


def test_matches_numpy_reference(tiny):
    tokens = np.random.default_rng(1).integers(0, 512, size=24)
    ours = np.array(tiny(mx.array(tokens)[None])[0])
    ref = numpy_forward(numpy_weights(tiny), tokens, head_dim=32)
    assert np.abs(ours - ref).max() <= 1e-4


def test_untied_head_no_qk_norm_and_rope_base_match_reference():
    args = tiny_args(normalize_qk_projections=False, share_input_output_layers=False,
                     rope_freq_constant=500.0)
    model = random_model(args, seed=3)
    tokens = np.random.default_rng(2).integers(0, 512, size=16)
    ours = np.array(model(mx.array(tokens)[None])[0])
    ref = numpy_forward(numpy_weights(model), tokens, head_dim=32, base=500.0, qk_norm=False)
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("chunks", [[1] * 20, [5, 1, 7, 1, 6], [20]])
def test_incremental_decoding_equals_full_forward(tiny, chunks):
    tokens = mx.array(np.random.default_rng(4).integers(0, 512, size=sum(chunks)))[None]
    full = tiny(tokens)
    cache = make_prompt_cache(tiny)
    pieces, start = [], 0
    for n in chunks:
        pieces.append(tiny(tokens[:, start:start + n], cache=cache))
        start += n
    assert cache[0].offset == tokens.shape[1]
    assert mx.abs(mx.concatenate(pieces, axis=1) - full).max().item() <= 1e-4


def test_agrees_with_mlx_lm_openelm(tiny):
    from mlx_lm.models import openelm as mlx_lm_openelm

    theirs = mlx_lm_openelm.Model(mlx_lm_openelm.ModelArgs.from_dict(tiny.args.to_dict()))
    theirs.load_weights(list(tree_flatten(tiny.parameters())))
    tokens = mx.array(np.random.default_rng(5).integers(0, 512, size=(2, 17)))
    assert mx.abs(theirs(tokens) - tiny(tokens)).max().item() <= 1e-5


def test_sanitize_drops_buffers_and_trims_padded_vocab(tiny):
    weights = dict(tree_flatten(tiny.parameters()))
    padded = mx.concatenate([weights["transformer.token_embeddings.weight"], mx.zeros((128, 256))])
    weights["transformer.token_embeddings.weight"] = padded
    weights["transformer.layers.0.attn.rotary_emb.inv_freq"] = mx.zeros((16,))
    clean = tiny.sanitize(weights)
    assert clean["transformer.token_embeddings.weight"].shape == (512, 256)
    assert not any("inv_freq" in k for k in clean)


def _corenet_geometry(layers: int, dim: int, head_dim: int = 64, groups: int = 4, divisor: int = 256):
    """corenet / HF ``OpenELMConfig.__post_init__`` written out here: np.linspace, round each
    np.float64 to two decimals (NumPy rounds half to even), make_divisible with the 10% rule."""
    def divisible(v, d):
        new = max(d, int(v + d / 2) // d * d)
        return new + d if new < 0.9 * v else new

    qkv = [round(v, 2) for v in np.linspace(0.5, 1.0, num=layers, dtype=float)]
    ffn = [round(v, 2) for v in np.linspace(0.5, 4.0, num=layers, dtype=float)]
    heads = [divisible(dim * m, head_dim * groups) // head_dim for m in qkv]
    return heads, [divisible(m * dim, divisor) for m in ffn]


@pytest.mark.parametrize("layers,dim", [(21, 1792), (21, 1152), (16, 1280), (36, 3072)])
def test_layer_wise_scaling_rounds_like_corenet_including_ties(layers, dim):
    """21 layers: np.linspace gives values such as 0.525 whose NumPy rounding differs from Python's
    round() on the same float; (21, 1792) got a different FFN width before the fix."""
    args = ModelArgs(num_transformer_layers=layers, model_dim=dim, head_dim=64)
    heads, ffn = _corenet_geometry(layers, dim)
    assert args.num_query_heads == heads
    assert args.ffn_dims == ffn
