"""Sharded inference on 8 simulated CPU devices (conftest's `eight_cpu_devices`): the same
answers as one device on 4x2 (data x tensor) and 8x1 meshes, dense and dynamic, KV cache
and no cache; parameters restored straight into their shardings; KV caches sharded on
batch and kv heads; the CLI's --mesh, in one process and in a two-process job.

The bundled tiny checkpoint has 2 kv heads, so its tensor-parallel mesh is data=4,tensor=2
and data=2,tensor=4 is the error case; the 2x4 table is checked on 7B shapes (abstract).
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec as P

from dynllava_jax import sharding as S

REPO = Path(__file__).resolve().parents[1]
IMG = "assets/images/portrait.png"
N_NEW = 6

SCRIPT = textwrap.dedent(r"""
    import json, re
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dynllava_jax import checkpoint as C, generate as G, model as M, sharding as S
    from dynllava_jax.config import preset
    from dynllava_jax.generate import GenOptions
    from dynllava_jax.inference import DEFAULT_CHECKPOINT, Llava, Request

    assert jax.device_count() == 8, jax.devices()
    out = {}
    REQS = [Request("What is in the image?", "%(img)s"), Request("Hi there"),
            Request("Describe the image in detail.", "%(img)s")]
    CONFIGS = [(mode, cache) for mode in ("dense", "dynamic") for cache in (True, False)]
    # Each mesh runs both modes and both cache settings; each pair on one mesh (compiles
    # are what this test spends its time on).
    MESH_CONFIGS = {"4x2": [("dense", True), ("dynamic", False)],
                    "8x1": [("dynamic", True), ("dense", False)]}
    FIELDS = ("token_ids", "image_tokens_kept", "kept_image_indices", "generated_tokens_in_cache")

    # -- spies: what the restore is asked for, what prefill gets, what decoding carries ---
    targets, seen = [], {}
    real_load, real_prefill, real_decode = C.load_params, G.jit_prefill, G.jit_decode

    def load_spy(path, target=None):
        targets.append(target)
        return real_load(path, target)

    def spec_of(x):  # jax drops trailing Nones on some outputs: one spelling
        spec = tuple(x.sharding.spec)
        return str(P(*(spec + (None,) * (x.ndim - len(spec)))))

    def specs(tree):
        return sorted({spec_of(x) for x in jax.tree_util.tree_leaves(tree)})

    def prefill_spy(params, tokens, lengths, image_start, pixels, **kw):
        if kw.get("mesh") is not None:
            seen.setdefault("inputs", set()).update(specs([tokens, lengths, image_start] +
                                                          ([pixels] if pixels is not None else [])))
        return real_prefill(params, tokens, lengths, image_start, pixels, **kw)

    def decode_spy(params, logits, state, *a, **kw):
        mesh = kw.get("mesh")
        if mesh is None:
            return real_decode(params, logits, state, *a, **kw)
        name = "x".join(str(mesh.shape[k]) for k in ("data", "tensor"))
        caches = [state.dense, state.sparse]
        seen.setdefault(name, {})["cache_in"] = specs(caches)
        seen[name]["cache_shapes"] = sorted({str(x.shape) for x in jax.tree_util.tree_leaves(caches)})
        if name == "4x2" and "all_gathers" not in seen:
            hlo = real_decode.lower(params, logits, state, *a, **kw).compile().as_text()
            seen["all_gathers"] = [int(np.prod([int(d) for d in m.group(1).split(",") if d]))
                                   for m in re.finditer(r"= \w+\[([\d,]*)\][^ ]* all-gather", hlo)]
        res = real_decode(params, logits, state, *a, **kw)
        seen[name]["cache_out"] = specs([res[2].dense, res[2].sparse])
        return res

    C.load_params, G.jit_prefill, G.jit_decode = load_spy, prefill_spy, decode_spy

    # TPU splash attention (Pallas's interpreter here) in shard_map: the shapes each device runs
    from dynllava_jax import attention as A
    real_splash_local = A._splash_local

    def splash_spy(q, k, *a, **kw):
        seen.setdefault("splash_local", set()).add((str(q.shape), str(k.shape)))
        return real_splash_local(q, k, *a, **kw)

    A._splash_local = splash_spy

    def answers(model, configs=CONFIGS, attention="auto"):
        res = {}
        for mode, cache in configs:
            o = GenOptions(max_new_tokens=%(n_new)d, mode=mode, use_cache=cache, attention=attention)
            res[f"{mode}-{cache}"] = [{k: a[k] for k in FIELDS} for a in model.answer(REQS, o)]
        return res

    out["one_device"] = answers(Llava(DEFAULT_CHECKPOINT))
    for name, spec in (("4x2", "data=4,tensor=2"), ("8x1", None)):
        mesh = S.parse_mesh(spec, kv_heads=2)
        targets.clear()
        m = Llava(DEFAULT_CHECKPOINT, mesh)
        # the restore: every leaf asked for straight into a sharding on this mesh
        (target,) = targets
        out[name + "_restore_sharded"] = all(
            isinstance(t.sharding, NamedSharding) and t.sharding.mesh == mesh
            for t in jax.tree_util.tree_leaves(target))
        p, L = m.params, m.params["llm"]["layers"]
        out[name + "_layers"] = len(L)
        pick = {"q": L[0]["q_proj"]["kernel"], "k": L[3]["k_proj"]["kernel"],
                "o": L[1]["o_proj"]["kernel"], "down": L[4]["down_proj"]["kernel"],
                "embed": p["llm"]["embed_tokens"]["embedding"], "lm_head": p["llm"]["lm_head"]["kernel"],
                "norm": L[0]["input_norm"]["scale"]}
        out[name + "_specs"] = {k: spec_of(v) for k, v in pick.items()}
        # the largest piece of any leaf on one device, as a fraction of the leaf, for the
        # leaves the table shards
        leaves = [x for x in jax.tree_util.tree_leaves(p) if any(x.sharding.spec)]
        out[name + "_sharded_leaves"] = len(leaves)
        out[name + "_max_shard_fraction"] = max(
            [max(s.data.size for s in x.addressable_shards) / x.size for x in leaves], default=1.0)
        out[name + "_on_mesh"] = all(isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
                                     for x in jax.tree_util.tree_leaves(p))
        out[name] = answers(m, MESH_CONFIGS[name])
        if name == "4x2":
            out["4x2_splash"] = answers(m, [("dynamic", True), ("dense", True), ("dynamic", False)],
                                        "splash")
    out["splash_local"] = sorted(seen.pop("splash_local"))
    out["inputs"] = sorted(seen.pop("inputs"))
    out["all_gathers"] = seen.pop("all_gathers")
    out["seen"] = seen

    # -- the table on a 2x4 mesh for 7B shapes, per layer as generation runs them ---------
    p7 = jax.eval_shape(lambda: G.inference_params(M.init_params(
        preset("llava-v1.5-7b"), jax.random.PRNGKey(0), with_predictors=True)))
    s7 = S.param_specs(p7, S.parse_mesh("data=2,tensor=4", kv_heads=32))
    l7 = s7["llm"]["layers"][31]
    out["specs7b_2x4"] = {k: str(l7[k]["kernel"]) for k in ("q_proj", "k_proj", "o_proj", "down_proj")}
    print("RESULT " + json.dumps(out))
""") % {"img": IMG, "n_new": N_NEW}


@pytest.fixture(scope="module")
def result(eight_cpu_devices):
    return eight_cpu_devices.run(SCRIPT, xla_flags="--xla_backend_optimization_level=0")


@pytest.mark.parametrize("mesh", ["4x2", "8x1"])
def test_sharded_answers_equal_one_device(result, mesh):
    ref = result["one_device"]
    assert set(ref) == {"dense-True", "dense-False", "dynamic-True", "dynamic-False"}
    assert len(result[mesh]) == 2 and {c.split("-")[0] for c in result[mesh]} == {"dense", "dynamic"}
    assert {c.split("-")[1] for c in result[mesh]} == {"True", "False"}
    for config, answers in result[mesh].items():
        assert answers == ref[config], (mesh, config)
    # dynamic really pruned (12 of 64 image tokens), dense kept all: the configs differ
    assert [a["image_tokens_kept"] for a in ref["dynamic-True"]] == [12, 0, 12]
    assert [a["image_tokens_kept"] for a in ref["dense-True"]] == [64, 0, 64]


def test_splash_attention_sharded_equals_one_device(result):
    """Prompt passes (KV cache and no cache) through splash attention on the 4x2 mesh: each
    device runs the kernel on its own rows (batch 4 over data=4: 1) and heads over tensor=2
    (the tiny LLM's 6 query / 2 kv heads: 3 / 1; the CLIP tower's and the image predictor's
    4: 2), the lengths padded to whole 128-token blocks; the answers are the one-device ones."""
    assert set(result["4x2_splash"]) == {"dynamic-True", "dense-True", "dynamic-False"}
    for config, answers in result["4x2_splash"].items():
        assert answers == result["one_device"][config], config
    # (q [rows, heads, T, D], k [rows, kv heads, S, D]) per device
    local = sorted(tuple(eval(x) for x in pair) for pair in result["splash_local"])
    assert local == [((1, 2, 128, 12), (1, 2, 128, 12)),  # tower (65 tokens), predictor (64)
                     ((1, 3, 256, 16), (1, 1, 256, 16))], local  # LLM prompts


@pytest.mark.parametrize("mesh", ["4x2", "8x1"])
def test_parameters_restored_sharded(result, mesh):
    r = result
    assert r[mesh + "_restore_sharded"] and r[mesh + "_on_mesh"]
    assert r[mesh + "_layers"] == 5  # per-layer leaves, as generation runs them
    s = r[mesh + "_specs"]
    if mesh == "4x2":
        # q/k/v split by heads over tensor, o/down on their input, vocab over tensor
        col, row = str(P(None, "tensor")), str(P("tensor", None))
        assert s == {"q": col, "k": col, "o": row, "down": row, "embed": row, "lm_head": col,
                     "norm": str(P(None))}
        assert r[mesh + "_sharded_leaves"] >= 5 * 7 + 2
        assert r[mesh + "_max_shard_fraction"] == 0.5  # no device holds a whole sharded leaf
    else:  # pure data parallelism: every weight replicated
        assert r[mesh + "_sharded_leaves"] == 0
        assert set(s.values()) <= {str(P(None, None)), str(P(None))}


def test_inputs_and_caches_sharded(result):
    # tokens, lengths, image starts, pixels, keys: on batch over data
    assert result["inputs"] == sorted([str(P("data")), str(P("data", None)),
                                       str(P("data", None, None, None))])
    s = result["seen"]
    # caches [B, K, S, D]: batch over data, kv heads over tensor, in and out of the loop
    # (4x2 ran dense, 8x1 dynamic)
    assert s["4x2"]["cache_in"] == s["4x2"]["cache_out"] == [str(P("data", "tensor", None, None))]
    assert s["8x1"]["cache_in"] == s["8x1"]["cache_out"] == [str(P("data", None, None, None))]
    assert all(sh.startswith("(4, 2,") for sh in s["4x2"]["cache_shapes"])
    # the decode loop gathers no weight or cache onto a device: only per-row bookkeeping,
    # each smaller than one token's hidden state (96)
    assert result["all_gathers"] and max(result["all_gathers"]) < 96


def test_7b_layers_on_2x4(result):
    col, row = str(P(None, "tensor")), str(P("tensor", None))
    assert result["specs7b_2x4"] == {"q_proj": col, "k_proj": col, "o_proj": row, "down_proj": row}


def infer(devices, *args):
    return subprocess.run([sys.executable, str(REPO / "infer.py"), *args], capture_output=True,
                          text=True, cwd=REPO, env=devices.env)


def test_cli_mesh(result, eight_cpu_devices):
    r = infer(eight_cpu_devices, "--mesh", "data=4,tensor=2", "--image", IMG, "--prompt",
              "What is in the image?", "--max-new-tokens", str(N_NEW), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["token_ids"] == result["one_device"]["dynamic-True"][0]["token_ids"]
    bad = infer(eight_cpu_devices, "--mesh", "data=2,tensor=4", "--prompt", "x")
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: --mesh data=2,tensor=4: tensor=4 does not divide the "
                                  "model's 2 kv heads; choose a tensor size that divides 2")


def test_two_processes_answer_their_own_questions(result, simulated_devices):
    """A two-process job (jax.distributed over loopback, 2 CPU devices each, data=2,tensor=2):
    each process passes its own question (one with an image, one without, so the global
    batch mixes them) and gets the one-device answer to it."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(simulated_devices(2).env, JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    questions = [["--image", IMG, "--prompt", "What is in the image?"], ["--prompt", "Hi there"]]
    procs = [subprocess.Popen(
        [sys.executable, str(REPO / "infer.py"), "--mesh", "data=2,tensor=2", "--max-new-tokens",
         str(N_NEW), "--json", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(i), *q], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i, q in enumerate(questions)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), outs[0][1][-3000:] + outs[1][1][-3000:]
    ref = result["one_device"]["dynamic-True"]
    for i, (stdout, _) in enumerate(outs):
        # gloo's C++ code prints its connection notes on stdout too
        ans = json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])
        assert ans["token_ids"] == ref[i]["token_ids"], i
        assert ans["kept_image_indices"] == ref[i]["kept_image_indices"], i


class _Dev:  # parse_mesh only counts devices before it builds the mesh
    process_index = 0


@pytest.mark.parametrize("spec,msg", [
    ("data=2,pipeline=4", "unknown mesh axis 'pipeline'"),
    ("data=2,tensor=2", "has 4 devices, there are 8"),
    ("data=3,tensor=-1", "8 devices are not divisible by the 3"),
    ("data=two", "needs an integer size"),
    ("data=2,data=4", "each axis once"),
    ("data=-1,tensor=-1", "at most one mesh axis may be -1"),
    ("data=2,tensor=4", "tensor=4 does not divide the model's 2 kv heads"),
])
def test_parse_mesh_errors(spec, msg):
    with pytest.raises(ValueError, match=msg):
        S.parse_mesh(spec, [_Dev()] * 8, kv_heads=2)


def test_parse_mesh_sizes():
    n = jax.device_count()
    assert dict(S.parse_mesh(None).shape) == {"data": n, "fsdp": 1, "tensor": 1}
    assert dict(S.parse_mesh(f"tensor=1,data={n}").shape) == {"data": n, "fsdp": 1, "tensor": 1}
    assert dict(S.parse_mesh("data=-1", kv_heads=2).shape)["data"] == n
