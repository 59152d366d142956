"""Sharding: the rules table, and a train step on a 2x2x2 mesh of 8 simulated CPU devices
equals the unsharded step.

The 8-device part runs in a subprocess (conftest's `eight_cpu_devices`).
"""

import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dynllava_jax import sharding as S

SCRIPT = textwrap.dedent(r"""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import ml_collections as mlc
    from jax.sharding import PartitionSpec as P
    from dynllava_jax import sharding as S, trainer as T, optim, model as M, objective as O
    from dynllava_jax.checkpoint import load_converted
    from dynllava_jax.config import preset

    assert jax.device_count() == 8, jax.devices()
    out = {}

    # -- rules on the 7B shapes (abstract: nothing is allocated) --------------------------
    mesh = S.make_mesh(2, 2, 2)
    p7 = jax.eval_shape(lambda: M.init_params(preset("llava-v1.5-7b"), jax.random.PRNGKey(0),
                                              with_predictors=True))
    specs = S.param_specs(p7, mesh)
    out["specs7b"] = {
        "q": str(specs["llm"]["layers"]["q_proj"]["kernel"]),
        "down": str(specs["llm"]["layers"]["down_proj"]["kernel"]),
        "embed": str(specs["llm"]["embed_tokens"]["embedding"]),
        "lm_head": str(specs["llm"]["lm_head"]["kernel"]),
        "norm": str(specs["llm"]["layers"]["input_norm"]["scale"]),
        "vision_fc1": str(specs["vision"]["layers"]["fc1"]["kernel"]),
        "pred_out": str(specs["image_predictor"]["out_3"]["kernel"]),
    }
    oc = mlc.ConfigDict(dict(lr=1e-3, predictor_lr=2e-3, weight_decay=0.0,
                             predictor_weight_decay=0.0, warmup_ratio=0.0, schedule="constant",
                             b1=0.9, b2=0.999, eps=1e-8, max_grad_norm=1.0))
    tx, sch = optim.make_optimizer(oc, 10)
    tr7, _ = optim.split_params(p7, optim.trainable_groups(p7))
    opt7 = jax.eval_shape(tx.init, tr7)
    osh = S.mirror_shardings(opt7, tr7, mesh)
    mu_specs = sorted({str(s.spec) for s in jax.tree_util.tree_leaves(osh)})
    out["opt_specs7b"] = mu_specs

    # -- one train step: unsharded (1 device, no accumulation) vs 2x2x2 (2 micro-batches) --
    cfg, params = load_converted("assets/tiny-dynamic-llava")
    cfg = cfg.replace_sparse(output_text_len_for_training=16)
    data = T.SyntheticBatches(cfg, 8, 128, seed=3)
    batch = next(data)
    groups = optim.trainable_groups(params)
    res = {}
    for name, mesh, g, remat in (("single", S.make_mesh(1, 1, 1, jax.devices()[:1]), 1, "none"),
                                 ("sharded", S.make_mesh(2, 2, 2), 2, "full")):
        state, sh = T.create_sharded_state(params, tx, jax.random.PRNGKey(7), groups, mesh)
        # a quarter of each batch unpruned (objective.dense_fraction): the same rows on both
        sc = T.StepConfig(total_steps=10, microbatches=g, remat=remat,
                          objective=O.Objective(ce_group_size=4, dense_fraction=0.25))
        step = T.jit_train_step(T.make_train_step(cfg, sc, tx, sch, mesh), sh,
                                S.batch_shardings(batch, mesh), mesh)
        gb = S.host_local_to_global(batch, mesh, 8)
        if name == "sharded":
            out["batch_shard_rows"] = sorted({s.data.shape[0] for s in gb["tokens"].addressable_shards})
            q = state.params["llm"]["layers"]["q_proj"]["kernel"]
            out["q_shard_shape"] = list(q.addressable_shards[0].data.shape)
        state, m = step(state, gb)
        state, m2 = step(state, S.host_local_to_global(next(data), mesh, 8))
        data.set_state({"index": 1})
        res[name] = (jax.device_get(m), jax.device_get(m2), jax.device_get(state.params))
    a, b = res["single"], res["sharded"]
    out["loss"] = [float(a[0]["loss"]), float(b[0]["loss"])]
    out["loss2"] = [float(a[1]["loss"]), float(b[1]["loss"])]
    out["metrics_maxrel"] = max(abs(float(a[0][k]) - float(b[0][k])) / max(abs(float(a[0][k])), 1.0)
                                for k in a[0])
    diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(x - y))), a[2], b[2])
    scale = jax.tree_util.tree_map(lambda x: float(np.max(np.abs(x))), a[2])
    out["param_maxdiff"] = max(jax.tree_util.tree_leaves(diffs))
    out["param_maxrel"] = max(d / max(s, 1e-6) for d, s in zip(jax.tree_util.tree_leaves(diffs),
                                                               jax.tree_util.tree_leaves(scale)))
    moved = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(x - y))), a[2],
                                   optim.split_params(params, groups)[0])
    out["param_moved_min"] = min(jax.tree_util.tree_leaves(moved))
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def eight_device_result(eight_cpu_devices):
    return eight_cpu_devices.run(SCRIPT)


def test_rules_table_on_7b_shapes(eight_device_result):
    s = eight_device_result["specs7b"]
    assert s["q"] == str(P(None, "fsdp", "tensor"))
    assert s["down"] == str(P(None, "tensor", "fsdp"))
    assert s["embed"] == str(P("tensor", "fsdp"))
    assert s["lm_head"] == str(P("fsdp", "tensor"))
    assert s["norm"] == str(P(None, None))
    assert s["vision_fc1"] == str(P(None, "fsdp", None))
    assert s["pred_out"] == str(P(None, None))
    # Adam moments are sharded like their parameters (FSDP + tensor), counts replicated.
    assert str(P(None, "fsdp", "tensor")) in eight_device_result["opt_specs7b"]
    assert str(P()) in eight_device_result["opt_specs7b"]


def test_sharded_step_equals_unsharded(eight_device_result):
    r = eight_device_result
    # the batch is split over data x fsdp = 4 devices; q_proj over fsdp x tensor
    assert r["batch_shard_rows"] == [2]
    assert r["q_shard_shape"] == [5, 48, 48]
    assert r["param_moved_min"] > 0  # every trainable leaf was updated
    np.testing.assert_allclose(r["loss"][0], r["loss"][1], rtol=1e-5)
    np.testing.assert_allclose(r["loss2"][0], r["loss2"][1], rtol=1e-4)
    assert r["metrics_maxrel"] < 1e-4, r  # loss terms, kept fractions, grad norm, ...
    # Adam's first steps are ~lr * sign(grad): tiny gradient differences (summation order)
    # can move a parameter by up to ~lr where the gradient is ~0; 1e-3 = lr here.
    assert r["param_maxdiff"] < 1e-3, r


def test_logical_to_spec_replicates_indivisible_dims():
    mesh = S.make_mesh(1, 1, 1, jax.devices()[:1])
    assert S.logical_to_spec(("embed", "mlp"), (6, 10), mesh) == P(None, None)
    assert S.param_logical_axes("llm/layers/q_proj/kernel", 3) == ("layers", "embed", "q_heads")
    assert S.param_logical_axes("image_predictor/block_0/qkv/kernel", 2) == (None, None)
    assert S.batch_spec(4, mesh) == P(None, None, None, None)


def test_make_mesh_sizes():
    n = jax.device_count()
    assert S.make_mesh(-1, 1, 1).shape["data"] == n
    with pytest.raises(ValueError):
        S.make_mesh(n + 1, 1, 1)
