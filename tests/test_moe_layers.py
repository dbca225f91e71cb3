"""SMoE / MH-MoE layers against the independent NumPy reference, and their routing machinery."""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_elm.models import moe
from mlx_elm.models.moe import MHMoE, RoutingStats, SparseMoE
from tests import reference_moe as ref


def numpy_params(layer: nn.Module) -> dict:
    return {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(layer.parameters())}


def spread_router(layer: SparseMoE, scale: float = 3.0) -> None:
    """A sharper random router, so top-k choices are far from ties."""
    r = layer.router
    if isinstance(r, nn.Linear):
        r.weight = r.weight * scale
    else:
        r.reduce_weight = r.reduce_weight * scale


@pytest.mark.parametrize("dispatch", ["gather", "blocked"])
@pytest.mark.parametrize("k,cf", [(1, 0.0), (2, 0.0), (1, 1.0), (2, 0.5), (3, 1.0)])
def test_sparse_moe_matches_reference(dispatch, k, cf):
    mx.random.seed(k * 10 + int(cf * 4))
    layer = SparseMoE(24, 6, 40, top_k=k, capacity_factor=cf, dispatch=dispatch)
    spread_router(layer)
    x = mx.random.normal((3, 11, 24))
    y, aux = layer(x, return_aux=True)
    r = ref.sparse_moe(np.array(x).reshape(-1, 24), numpy_params(layer), k, cf)
    np.testing.assert_allclose(np.array(y).reshape(-1, 24), r["y"], rtol=2e-5, atol=2e-5)
    assert float(aux["kept"]) == r["keep"].sum()
    if cf == 0.5:
        assert r["keep"].sum() < r["keep"].size, "the case must actually drop assignments"
    np.testing.assert_allclose(float(aux["balance"]), r["balance"], rtol=1e-5)
    np.testing.assert_allclose(float(aux["z"]), r["z"], rtol=1e-5)
    np.testing.assert_array_equal(np.array(aux["first"]), np.bincount(r["choice"][:, 0], minlength=6))


@pytest.mark.parametrize("heads,k,router,cf", [(2, 2, "linear", 0.0), (4, 1, "linear", 1.0), (4, 2, "xmoe", 0.0)])
def test_mhmoe_matches_reference(heads, k, router, cf):
    mx.random.seed(heads + k)
    layer = MHMoE(32, heads, 8, 24, top_k=k, router=router, capacity_factor=cf)
    spread_router(layer.moe)
    layer.head.bias = mx.random.normal(layer.head.bias.shape) * 0.1  # biases matter too
    layer.merge.bias = mx.random.normal(layer.merge.bias.shape) * 0.1
    x = mx.random.normal((2, 7, 32))
    y, aux = layer(x, return_aux=True)
    r = ref.mh_moe(np.array(x).reshape(-1, 32), numpy_params(layer), heads, k, cf)
    np.testing.assert_allclose(np.array(y).reshape(-1, 32), r["y"], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(float(aux["balance"]), r["balance"], rtol=1e-5)
    assert float(aux["rows"]) == 14 * heads and float(aux["tokens"]) == 14


def test_mhmoe_with_one_head_and_identity_projections_is_sparse_moe():
    mx.random.seed(3)
    layer = MHMoE(16, 1, 5, 12, top_k=2)
    layer.head.weight, layer.head.bias = mx.eye(16), mx.zeros((16,))
    layer.merge.weight, layer.merge.bias = mx.eye(16), mx.zeros((16,))
    smoe = SparseMoE(16, 5, 12, top_k=2)
    smoe.update(layer.moe.parameters())
    x = mx.random.normal((4, 6, 16))
    assert mx.array_equal(layer(x), smoe(x)).item()


def test_blocked_dispatch_equals_gather_with_empty_and_crowded_experts():
    mx.random.seed(0)
    experts = moe.SwitchGLU(8, 16, 12)
    x = mx.random.normal((300, 8))
    inds = mx.concatenate([mx.zeros((200, 2), dtype=mx.uint32),  # expert 0 crowded, most experts empty
                           mx.random.randint(0, 3, (100, 2)).astype(mx.uint32)])
    for block in (None, 8, 64):
        a = moe.gather_dispatch(experts, x, inds)
        b = moe.blocked_dispatch(experts, x, inds, block)
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)


def test_capacity_takes_slots_in_k_major_order():
    # 4 rows, k = 2, experts {0, 1}; capacity 2 slots each.
    inds = mx.array([[0, 1], [0, 1], [0, 1], [1, 0]], dtype=mx.uint32)
    keep = np.array(moe.capacity_keep(inds, 2, 2))
    # first choices: expert 0 gets rows 0, 1 (row 2 overflows), expert 1 gets row 3;
    # second choices: expert 1 has one slot left -> row 0; expert 0 is full.
    np.testing.assert_array_equal(keep, [[1, 1], [1, 0], [0, 0], [1, 0]])
    assert moe.expert_capacity(10, 4, 2, 1.0) == 2 * math.ceil(10 / 4)


def test_balance_loss_equals_formula_on_hand_built_routing():
    probs = mx.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]])
    first = mx.array([0, 0, 2, 1])
    # E * sum_e mean_s p[s, e] * f_e with f = (2, 1, 1) / 4 and mean p = (0.4, 0.275, 0.325)
    expected = 3 * (0.4 * 0.5 + 0.275 * 0.25 + 0.325 * 0.25)
    assert abs(moe.balance_loss(probs, first, 3).item() - expected) < 1e-6
    uniform = mx.full((8, 4), 0.25)
    assert abs(moe.balance_loss(uniform, mx.arange(8) % 4, 4).item() - 1.0) < 1e-6  # its minimum


def test_activation_ratio_per_subtoken_and_per_token_on_hand_built_routing():
    # 2 tokens x h = 2 sub-tokens, k = 1, E = 4: token 0 -> experts (0, 0), token 1 -> (1, 3).
    inds = mx.array([[0], [0], [1], [3]], dtype=mx.uint32)
    logits = mx.zeros((4, 4))
    aux = moe.routing_aux(logits, mx.softmax(logits, -1), inds, None, 4, group=2)
    st = RoutingStats(4, group=2)
    st.add(aux)
    np.testing.assert_array_equal(st.load, [2, 1, 0, 1])
    np.testing.assert_allclose(st.per_token, [1.0, 0.5, 0.0, 0.5])  # routings / tokens
    np.testing.assert_allclose(st.per_subtoken, [0.5, 0.25, 0.0, 0.25])  # routings / sub-tokens
    np.testing.assert_allclose(st.token_coverage, [0.5, 0.5, 0.0, 0.5])  # tokens touching e / tokens
    assert st.activation(0.3, "per_token") == 0.75
    assert st.activation(0.3, "per_subtoken") == 0.25
    assert st.activation(0.3, "token_coverage") == 0.75
    assert st.dead() == 1 and st.cold() == 1
    share = np.array([0.5, 0.25, 0.0, 0.25])
    assert abs(st.entropy() - float(-(share[share > 0] * np.log(share[share > 0])).sum() / np.log(4))) < 1e-12
    assert moe.activation_ratio([st, st], 0.3) == 0.75


@pytest.mark.parametrize("dispatch", ["gather", "blocked"])
def test_gradients_reach_router_experts_head_and_merge(dispatch):
    mx.random.seed(1)
    layer = MHMoE(32, 2, 6, 16, top_k=1, dispatch=dispatch)
    x = mx.random.normal((2, 9, 32))

    def loss(params):
        layer.update(params)
        return (layer(x) ** 2).sum()  # task loss only: the router learns through the top-1 score

    grads = dict(tree_flatten(mx.grad(loss)(layer.trainable_parameters())))
    for name in ("head.weight", "head.bias", "merge.weight", "moe.router.weight", "moe.experts.gate_proj.weight",
                 "moe.experts.up_proj.weight", "moe.experts.down_proj.weight"):
        assert float(mx.abs(grads[name]).sum()) > 0, name


def test_balance_loss_gradient_reaches_the_router_and_compiled_step_runs():
    mx.random.seed(2)
    layer = MHMoE(32, 2, 6, 16, top_k=2, router="xmoe", capacity_factor=1.0)
    x = mx.random.normal((2, 9, 32))

    def loss(model, x):
        y, aux = model(x, return_aux=True)
        return y.square().mean() + 0.01 * aux["balance"] + 1e-3 * aux["z"]

    grad_fn = nn.value_and_grad(layer, loss)
    _, g = grad_fn(layer, x)
    g = dict(tree_flatten(g))
    assert float(mx.abs(g["moe.router.wg"]).sum()) > 0 and float(mx.abs(g["moe.router.reduce_weight"]).sum()) > 0

    opt = optim.AdamW(1e-3)
    opt.init(layer.trainable_parameters())
    state = [layer.state, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x):
        val, grads = nn.value_and_grad(layer, loss)(layer, x)
        opt.update(layer, grads)
        return val

    first = step(x)
    for _ in range(3):
        last = step(x)
    mx.eval(first, last, state)
    assert last.item() < first.item()


def test_xmoe_router_renormalize_keeps_the_forward():
    mx.random.seed(4)
    layer = SparseMoE(16, 4, 8, router="xmoe")
    x = mx.random.normal((5, 16))
    before = layer(x)
    layer.router.wg = layer.router.wg * 7.0
    moe.renormalize_routers(layer)
    np.testing.assert_allclose(np.linalg.norm(np.array(layer.router.wg), axis=-1), 1.5, rtol=1e-5)
    np.testing.assert_allclose(np.array(layer(x)), np.array(before), rtol=1e-5, atol=1e-6)
    wg = np.array(moe.orthogonal((4, 16), 0.32))
    np.testing.assert_allclose(wg @ wg.T, 0.32**2 * np.eye(4), atol=1e-5)


@pytest.mark.parametrize("dispatch", ["gather", "blocked"])
def test_quantized_experts_run_and_stay_close(dispatch):
    mx.random.seed(5)
    layer = MHMoE(128, 2, 4, 64, top_k=2, dispatch=dispatch)
    x = mx.random.normal((1, 40, 128))
    dense = layer(x)
    nn.quantize(layer, group_size=32, bits=8, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                and not isinstance(m, nn.Linear))  # experts only; router, head and merge stay dense
    kinds = {type(m).__name__ for _, m in layer.named_modules()}
    assert "QuantizedSwitchLinear" in kinds and "QuantizedLinear" not in kinds
    q = layer(x)
    err = float(mx.abs(q - dense).max()) / float(mx.abs(dense).max())
    assert err < 0.05
