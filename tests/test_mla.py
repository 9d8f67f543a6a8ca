"""Multi-head Latent Attention (DeepSeek-V2): the model against transformers' logits (a checkpoint built by
tests/fixtures/deepseek_tiny/make_fixture.py), absorbed == non-absorbed decode, the paged latent cache in the
pool (prefix sharing, accounting, copy-on-write, swap), rf.mla_decode against its float64 reference and a
direct loop, the memory planner, config refusals. GPU tests (marked gpu): the kernel on odd sizes, split-KV,
poisoned outputs and caches, strided arena views, the model in fp16 / fp32.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from rawformer.export import load_hf
from rawformer.models import DeepseekV2Config, GPT2Config, LlamaConfig, config_from_dict, deepseek
from rawformer.models.config import deepseek_rope
from tolerances import assert_close, poison

import rawformer as rf
from rawformer.kernels import modules
from rawformer.memory import KVPool
from rawformer.memory.latent import LatentArena
from rawformer.memory.planner import kv_bytes_per_token, mha_bytes_per_token, plan
from rawformer.ops import mla as mla_op
from rawformer.ops.mla import mla_decode, mla_decode_ref

FIXTURE = Path(__file__).parent / "fixtures" / "deepseek_tiny"
REF = np.load(FIXTURE / "reference.npz")
PROMPT = REF["prompt"].tolist()

# a small config with every feature: q_lora, MoE (group-limited, scaled), YaRN, v_head_dim != qk_head_dim
TINY = dict(vocab_size=53, hidden_size=32, intermediate_size=40, moe_intermediate_size=12,
            num_hidden_layers=2,
            first_k_dense_replace=1, num_attention_heads=3, q_lora_rank=20, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=6, n_shared_experts=1,
            num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=3, topk_group=2,
            routed_scaling_factor=2.0, max_position_embeddings=128,
            rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8})  # fmt: skip


def make_arena(model, num_blocks=24, block_size=4, xp=None, dtype=None):
    if dtype is None:
        return model.make_arena(block_size, num_blocks=num_blocks)
    return LatentArena(**model.cache_geometry, dtype=dtype, block_size=block_size, num_blocks=num_blocks,
                       xp=xp or np)  # fmt: skip


def greedy(model, arena, prompt, steps):
    """Prefill + `steps` greedy decode steps through a KVPool; returns (tokens, last-row logits per step)."""
    pool = KVPool(arena)
    pool.add_sequence(0, prompt)
    lg = model.forward(pool.prepare([0]), arena, last_only=True)
    toks, rows = [], [rf.backend.to_numpy(lg[0])]
    for _ in range(steps):
        toks.append(int(np.argmax(rows[-1])))
        lg = model.forward(pool.prepare([0], [[toks[-1]]]), arena)
        rows.append(rf.backend.to_numpy(lg[-1]))
    return toks, np.array(rows)


# ---- against transformers ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_logits_match_transformers(dtype):
    model = load_hf(FIXTURE, dtype=dtype, device="cpu")
    assert isinstance(model, deepseek.DeepseekV2Model)
    arena = make_arena(model)
    pool = KVPool(arena)
    pool.add_sequence(0, PROMPT)
    logits = model.forward(pool.prepare([0]), arena)
    assert_close(logits, REF["logits"], np.float32, "prefill logits", rtol=1e-4)
    assert np.abs(REF["logits"]).max() > 1.0  # the fixture's logits are not all ~0: the test can fail


@pytest.mark.parametrize("absorb", [True, False])
def test_greedy_generation_matches_transformers(absorb):
    model = load_hf(FIXTURE, dtype=np.float64, device="cpu")
    model.absorb = absorb
    toks, rows = greedy(model, make_arena(model, block_size=8), PROMPT, len(REF["generated"]))
    assert toks == REF["generated"].tolist()
    n = len(PROMPT)
    # logits of every decode step against transformers' forward over prompt + continuation
    assert_close(rows[:-1], REF["full_logits"][n - 1 : n - 1 + len(toks)], np.float32, "decode logits", 1e-4)


def test_runtime_generator_with_a_latent_pool():
    from rawformer.runtime.generate import Generator

    model = load_hf(FIXTURE, device="cpu")
    gen = Generator(model, KVPool(model.make_arena(16, num_blocks=16)))
    out = gen.generate([PROMPT], max_new_tokens=len(REF["generated"]))
    assert out.results[0].token_ids == REF["generated"].tolist()


def test_config_json_of_transformers_5():
    d = json.loads((FIXTURE / "config.json").read_text())
    cfg = config_from_dict(d)
    assert isinstance(cfg, DeepseekV2Config) and cfg.rope_dict["rope_type"] == "yarn"
    inv, gain, scale = deepseek_rope(cfg)
    assert gain == 1.0  # mscale == mscale_all_dim
    m = 0.1 * 0.707 * math.log(4.0) + 1.0
    assert scale == pytest.approx(24**-0.5 * m * m)
    assert inv[0] == 1.0 and inv[-1] == pytest.approx(1e4**-0.75 / 4)  # extrapolated .. interpolated ends


LITE_CONFIG_JSON = {  # DeepSeek-V2-Lite's config.json as published (trust_remote_code era keys)
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "ep_size": 1, "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1,
    "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True,
    "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "attention_bias": False,
}  # fmt: skip


def test_published_v2_lite_config():
    cfg = config_from_dict(LITE_CONFIG_JSON)
    assert cfg.q_lora_rank is None and cfg.is_moe_layer(1) and not cfg.is_moe_layer(0)
    inv, gain, scale = deepseek_rope(cfg)
    m = 0.1 * 0.707 * math.log(40) + 1.0
    assert gain == 1.0 and scale == pytest.approx(192**-0.5 * m * m) and np.isfinite(inv).all()
    shapes = deepseek.weight_shapes(cfg)
    assert shapes["layers.3.self_attn.kv_b_proj.weight"] == (16 * 256, 512)
    assert shapes["layers.3.mlp.experts.63.down_proj.weight"] == (2048, 1408)
    assert shapes["layers.3.mlp.shared_experts.up_proj.weight"] == (2816, 2048)
    assert "layers.0.mlp.gate_proj.weight" in shapes and "layers.0.mlp.gate.weight" not in shapes
    n = sum(math.prod(v) for v in shapes.values())
    assert 15.5e9 < n < 16.0e9  # DeepSeek-V2-Lite: 15.7B parameters
    assert kv_bytes_per_token(cfg) == 27 * 576 * 2


# ---- absorbed == non-absorbed ------------------------------------------------------------------------------


def run_model(model, arena, schedule):
    """schedule: list of (seq ids, new token lists or None); returns the logits of each step."""
    pool = KVPool(arena)
    out = []
    for sids, new in schedule:
        for sid, toks in zip(sids, new, strict=True):
            if sid not in pool._seqs:  # a new sequence: its prompt
                pool.add_sequence(sid, toks)
        first = all(len(pool._seqs[s].blocks) and pool._seqs[s].num_computed == 0 for s in sids)
        batch = pool.prepare(sids) if first else pool.prepare(sids, new)
        out.append(model.forward(batch, arena))
    return out


def test_absorbed_equals_non_absorbed_decode():
    cfg = DeepseekV2Config(**TINY)
    model = deepseek.init_random(cfg, seed=3, dtype=np.float64, std=0.3)
    rng = np.random.default_rng(0)
    prompts = {0: rng.integers(0, 53, 7).tolist(), 1: rng.integers(0, 53, 12).tolist()}
    res = {}
    for absorb in (True, False):
        model.absorb = absorb
        arena = make_arena(model, num_blocks=32, block_size=4)
        pool = KVPool(arena)
        for sid, p in prompts.items():
            pool.add_sequence(sid, p)
        steps = [model.forward(pool.prepare([0, 1]), arena)]
        for i in range(3):  # q_len 1, then 2 tokens per sequence (speculative: causal among the new ones)
            new = [[5 + i], [7 + i]] if i != 1 else [[5, 6], [7, 8]]
            steps.append(model.forward(pool.prepare([0, 1], new), arena))
        res[absorb] = steps
    for a, b in zip(res[True], res[False], strict=True):
        assert_close(a, b, np.float64, "absorbed vs expanded", rtol=1e-10)
    assert np.abs(res[True][-1]).max() > 0.1


def test_decode_equals_full_prefill_and_prefix_hit():
    """A decode continuation and a prefix-cache hit (gather path) give the logits of one prefill."""
    cfg = DeepseekV2Config(**TINY)
    model = deepseek.init_random(cfg, seed=5, dtype=np.float64, std=0.3)
    toks = np.random.default_rng(1).integers(0, 53, 13).tolist()
    arena = make_arena(model, num_blocks=32, block_size=4)
    pool = KVPool(arena)
    pool.add_sequence("full", toks)
    full = model.forward(pool.prepare(["full"]), arena)  # (13, V)
    # a second sequence with the same first 8 tokens shares 2 full blocks: only 5 tokens are computed
    cached = pool.add_sequence("hit", toks)
    assert cached == 12  # 3 full blocks of 4 match
    batch = pool.prepare(["hit"])
    assert not batch.is_prefill
    hit = model.forward(batch, arena)
    assert_close(hit, full[cached:], np.float64, "prefix-hit logits", rtol=1e-10)
    # decode: prefill 10 then 3 single tokens
    pool2 = KVPool(make_arena(model, num_blocks=32, block_size=4))
    a2 = pool2.arena
    pool2.add_sequence(0, toks[:10])
    rows = [model.forward(pool2.prepare([0]), a2)[-1]]
    for t in toks[10:]:
        rows.append(model.forward(pool2.prepare([0], [[t]]), a2)[-1])
    assert_close(np.array(rows), full[9:], np.float64, "decode vs prefill", rtol=1e-10)


def test_float32_model_close_to_float64():
    cfg = DeepseekV2Config(**TINY)
    m64 = deepseek.init_random(cfg, seed=2, dtype=np.float64, std=0.3)
    m32 = deepseek.init_random(cfg, seed=2, dtype=np.float32, std=0.3)
    p = [3, 1, 4, 1, 5, 9, 2, 6]
    t64, r64 = greedy(m64, make_arena(m64), p, 4)
    t32, r32 = greedy(m32, make_arena(m32), p, 4)
    assert t64 == t32
    assert_close(r32, r64, np.float32, "float32 model", rtol=1e-4)


# ---- the paged latent cache in the pool --------------------------------------------------------------------


def test_latent_arena_geometry_and_views():
    a = LatentArena(3, 16, 4, "float32", num_blocks=5, xp=np)
    assert a.block_size == 64 and a.data.shape == (3, 1, 5, 64, 1, 20)
    assert (
        a.token_bytes == 3 * 20 * 4 and a.block_bytes == 64 * a.token_bytes and a.nbytes == 5 * a.block_bytes
    )
    assert a.latent(1).shape == (5, 64, 16) and a.rope(1).shape == (5, 64, 4)
    a.rows(2)[70] = np.arange(20)
    assert np.array_equal(a.latent(2)[1, 6], np.arange(16)) and np.array_equal(
        a.rope(2)[1, 6], [16, 17, 18, 19]
    )
    b = LatentArena(2, 512, 64, "float16", budget_bytes=10 * 2 * 576 * 2 * 64 + 5, xp=np)
    assert b.num_blocks == 10
    with pytest.raises(TypeError, match="latent"):
        a.k(0)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        LatentArena(2, 0, 4, "float32", num_blocks=2, xp=np)
    with pytest.raises(TypeError, match="dtype"):
        LatentArena(2, 8, 4, "int8", num_blocks=2, xp=np)


def test_latent_pool_prefix_sharing_accounting_cow_and_swap():
    arena = LatentArena(2, 6, 2, "float64", block_size=4, num_blocks=12, xp=np)
    arena.data[...] = np.arange(arena.data.size, dtype=np.float64).reshape(arena.data.shape)
    pool = KVPool(arena)
    pool.add_sequence("a", list(range(10)))  # 3 blocks (2 full + 1 partial)
    pool.prepare(["a"])
    assert pool.add_sequence("b", list(range(9))) == 8  # shares the 2 full blocks
    st = pool.stats()
    assert st.block_bytes == 4 * 2 * 8 * 8 and st.blocks_used == 4 and st.blocks_shared == 2
    assert st.bytes_used == 4 * st.block_bytes and st.bytes_reserved == arena.nbytes
    assert pool.block_table("a")[:2] == pool.block_table("b")[:2]
    # fork + append: copy-on-write of the shared partial block copies every layer's latent + rope row
    pool.fork("a", "c")
    before = arena.data[:, :, pool.block_table("a")[2]].copy()
    pool.prepare(["c"], [[99]])
    new_block = pool.block_table("c")[2]
    assert new_block != pool.block_table("a")[2]
    assert np.array_equal(arena.data[:, :, new_block, :2], before[:, :, :2])  # the 2 tokens before 99
    # swap out and back: the rows return (possibly in other blocks)
    rows = arena.data[:, :, pool.block_table("a")].copy()
    pool.swap_out("a")
    pool.swap_in("a")
    assert np.array_equal(arena.data[:, :, pool.block_table("a")], rows)


# ---- rf.mla_decode ---------------------------------------------------------------------------------------


def paged_case(rng, seqs, q_len, heads, r, dr, ctx, block_size, dtype=np.float64, num_blocks=None):
    """Random queries, a latent arena-like cache with shuffled block tables, and the contexts."""
    width = max(1, -(-max(ctx) // block_size))
    num_blocks = num_blocks or seqs * width + 3
    data = rng.standard_normal((num_blocks, block_size, r + dr))
    perm = rng.permutation(num_blocks)[: seqs * width].reshape(seqs, width).astype(np.int32)
    for s in range(seqs):  # unused table entries: -1
        perm[s, -(-ctx[s] // block_size) :] = -1
    qa = rng.standard_normal((seqs, q_len, heads, r)).astype(dtype)
    qr = rng.standard_normal((seqs, q_len, heads, dr)).astype(dtype)
    return qa, qr, data.astype(dtype), perm, np.array(ctx, dtype=np.int32)


def direct(qa, qr, lat, rop, tables, ctx, scale):
    """The formula with Python loops over (sequence, token, head)."""
    seqs, q_len, heads, r = qa.shape
    bs = lat.shape[1]
    out = np.zeros(qa.shape)
    for s in range(seqs):
        for t in range(q_len):
            last = int(ctx[s]) - q_len + t
            if last < 0:
                continue
            pos = np.arange(last + 1)
            c = lat[tables[s, pos // bs], pos % bs].astype(np.float64)
            k = rop[tables[s, pos // bs], pos % bs].astype(np.float64)
            for h in range(heads):
                z = scale * (c @ qa[s, t, h] + k @ qr[s, t, h])
                p = np.exp(z - z.max())
                out[s, t, h] = p @ c / p.sum()
    return out


@pytest.mark.parametrize(
    "q_len,heads,ctx", [(1, 1, [1]), (1, 5, [7, 0, 13]), (3, 2, [3, 9]), (2, 4, [1, 17])]
)
def test_mla_decode_reference(rng, q_len, heads, ctx):
    qa, qr, data, tables, ctxa = paged_case(rng, len(ctx), q_len, heads, 12, 4, ctx, 4)
    lat, rop = data[..., :12], data[..., 12:]  # strided views, as the arena's
    out = mla_decode(qa, qr, lat, rop, tables, ctxa, scale=0.3)
    assert_close(out, direct(qa, qr, lat, rop, tables, ctxa, 0.3), np.float64, "mla_decode")
    _, lse = mla_decode_ref(qa, qr, lat, rop, tables, ctxa, 0.3, return_lse=True)
    blind = ctxa[:, None] - q_len + np.arange(q_len)[None, :] < 0  # (S, n) queries that see nothing
    assert np.isneginf(lse[blind]).all() and np.isfinite(lse[~blind]).all()
    assert not out[blind].any()


def test_mla_decode_argument_errors(rng):
    qa, qr, data, tables, ctx = paged_case(rng, 2, 1, 2, 8, 4, [5, 3], 4)
    lat, rop = data[..., :8], data[..., 8:]
    with pytest.raises(ValueError, match="q_rope"):
        mla_decode(qa, qr[:1], lat, rop, tables, ctx)
    with pytest.raises(ValueError, match="latent_cache"):
        mla_decode(qa, qr, data, rop, tables, ctx)
    with pytest.raises(TypeError, match="block_tables"):
        mla_decode(qa, qr, lat, rop, tables.astype(np.float32), ctx)
    with pytest.raises(ValueError, match="context_lens\\[1\\]"):
        mla_decode(qa, qr, lat, rop, tables, np.array([5, 99], np.int32))
    bad = tables.copy()
    bad[0, 0] = 10**6
    with pytest.raises(ValueError, match="block id 1000000"):
        mla_decode(qa, qr, lat, rop, bad, ctx)
    with pytest.raises(TypeError, match="dtype"):
        mla_decode(qa, qr.astype(np.float32), lat, rop, tables, ctx)
    with pytest.raises(ValueError, match="block_size"):
        mla_decode(qa, qr, np.zeros((3, 3, 8)), np.zeros((3, 3, 4)), tables, ctx)
    with pytest.raises(ValueError, match="tile_config is for version=2"):
        mla_decode(qa, qr, lat, rop, tables, ctx, tile_config=mla_op.V2_SMALL)
    with pytest.raises(ValueError, match="tile_config for version 3 must be one of"):
        mla_decode(qa, qr, lat, rop, tables, ctx, version=3, tile_config=mla_op.V2_SMALL)
    with pytest.raises(ValueError, match="version must be one of"):
        mla_decode(qa, qr, lat, rop, tables, ctx, version=4)
    with pytest.raises(ValueError, match="CUDA kernel"):
        mla_decode(qa, qr, lat, rop, tables, ctx, version=2)


H100_SMEM_PER_SM, H100_SMEM_OPTIN = 233472, 232448


def test_kernel_plans_fit_and_are_registered():
    registered = set(mla_op._instantiations())
    for version in (1, 2):
        for rows in (1, 16, 17, 64, 128, 384):
            expr, threads, rows_per_cta, tile, smem = mla_op.kernel_plan(rows, version=version)
            assert expr in registered and expr.startswith(f"mla_decode_v{version}<512, 64,")
            assert smem <= H100_SMEM_OPTIN and threads % 32 == 0 and tile % 16 == 0
    for config in mla_op.V2_CONFIGS:
        expr, *_, smem = mla_op.kernel_plan(128, version=2, tile_config=config)
        assert expr in registered and smem <= H100_SMEM_OPTIN, (config, smem)
    # the v2 defaults are sized for two resident CTAs per H100 SM (1 KB per CTA reserved by the system)
    for rows in (16, 128):
        smem = mla_op.kernel_plan(rows, version=2)[4]
        assert 2 * (smem + 1024) <= H100_SMEM_PER_SM, (rows, smem)
    assert mla_op.kernel_plan(16, version=2)[2] == 16 and mla_op.kernel_plan(17, version=2)[2] == 32
    assert mla_op.kernel_plan(16, version=1)[0] == "mla_decode_v1<512, 64, 1, 4, 64, 2>"  # v1 unchanged
    assert mla_op.kernel_plan(64, version=1)[0] == "mla_decode_v1<512, 64, 4, 8, 32, 2>"


def test_v3_plans_fit_and_are_registered():
    registered = set(mla_op._instantiations())
    for config in mla_op.V3_CONFIGS:
        mt, wm, cg, tk, stages = config
        expr, threads, rows_per_cta, tile, smem = mla_op.kernel_plan(128, version=3, tile_config=config)
        assert expr in registered and expr == f"mla_decode_v3<512, 64, {mt}, {wm}, {cg}, {tk}, {stages}>"
        assert threads == 32 * (mt // wm) * cg and rows_per_cta == 16 * mt and tile == tk
        assert smem + 1024 <= H100_SMEM_PER_SM and smem <= H100_SMEM_OPTIN, (config, smem)
        assert mt % wm == 0 and (tk // cg) % 16 == 0 and (512 // cg) % 64 == 0 and tk % (threads // 32) == 0
    # the defaults by rows: one m-tile for <= 16 rows (16 heads), 32 rows (2 CTAs per SM), 64 rows
    assert mla_op.kernel_plan(16, version=3)[0] == "mla_decode_v3<512, 64, 1, 1, 4, 64, 2>"
    assert mla_op.kernel_plan(1, version=3)[2] == 16 and mla_op.kernel_plan(17, version=3)[2] == 32
    assert mla_op.kernel_plan(32, version=3)[2] == 32 and mla_op.kernel_plan(33, version=3)[2] == 64
    mid = mla_op.kernel_plan(32, version=3)[4]
    assert 2 * (mid + 1024) <= H100_SMEM_PER_SM  # two resident CTAs per H100 SM
    assert mla_op.kernel_plan(128, version=3)[0] == "mla_decode_v3<512, 64, 4, 2, 4, 64, 2>"
    a100 = 166912  # sharedMemPerBlockOptin of an A100: the default configs that need more fall back
    for rows in (1, 16, 17, 32, 33, 128):
        expr, *_, smem = mla_op.kernel_plan(rows, version=3, smem_limit=a100)
        assert expr in registered and smem <= a100
    assert mla_op.kernel_plan(16, version=3, smem_limit=a100)[0] == "mla_decode_v3<512, 64, 1, 1, 2, 32, 2>"
    assert mla_op.kernel_plan(128, version=3, smem_limit=H100_SMEM_OPTIN)[2] == 64  # the H100 keeps 64 rows
    assert mla_op.DEFAULT_VERSION in mla_op.VERSIONS


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_v3_shared_bytes_match_the_kernel(tmp_path):
    """The launcher's shared-memory size of every v3 config equals MlaV3Shape::SMEM (static_asserts compiled
    by nvcc; no kernel is instantiated, so this takes a second)."""
    lines = ['#include "mla_decode.cu"']
    for c in mla_op.V3_CONFIGS:
        smem = mla_op.kernel_plan(128, version=3, tile_config=c)[4]
        args = ", ".join(str(n) for n in c)
        lines.append(f'static_assert(rf::MlaV3Shape<512, 64, {args}>::SMEM == {smem}, "smem {args}");')
    src = tmp_path / "v3_smem.cu"
    src.write_text("\n".join(lines) + "\n")
    cmd = [NVCC, "-std=c++17", "-arch=sm_90", f"-I{modules.source_dir()}", "-c", str(src), "-o",
           str(tmp_path / "v3_smem.o")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_split_rule_fills_the_resident_slots():
    choose = mla_op.choose_num_splits
    assert choose(32, 2048, 132) == 4  # v1's rule: 128 CTAs, one per SM
    assert choose(32, 2048, 132, ctas_per_sm=2) == 8  # v2, 16 heads: 256 CTAs = 2 per SM
    assert choose(128, 2048, 132, ctas_per_sm=2) == 2  # v2, 128 heads (32 x 4 chunks of 32 rows)
    assert choose(32, 512, 132, ctas_per_sm=2) == 2  # >= 256 positions per split
    assert choose(300, 4096, 132, ctas_per_sm=2) == 1
    assert choose(0, 4096, 132, ctas_per_sm=2) == 1 and choose(4, 0, 132) == 1


# ---- planner and config ---------------------------------------------------------------------------------


def test_planner_bytes_per_token_and_plan():
    ds = DeepseekV2Config()  # DeepSeek-V2: 60 layers, 128 heads, 512 + 64 cached
    assert kv_bytes_per_token(ds) == 60 * 576 * 2
    assert mha_bytes_per_token(ds) == 60 * 128 * (128 + 64 + 128) * 2
    assert kv_bytes_per_token(GPT2Config(), "float32") == 2 * 12 * 768 * 4
    assert kv_bytes_per_token(LlamaConfig(num_key_value_heads=8)) == 2 * 32 * 8 * 128 * 2
    p = plan(ds, 10 * 69120 * 64 + 1, context_len=130)
    assert (p.kind, p.block_size, p.num_blocks, p.tokens, p.max_seqs) == ("mla", 64, 10, 640, 3)
    assert "mla cache" in p.describe()
    with pytest.raises(TypeError, match="no decode cache"):
        kv_bytes_per_token(object())
    with pytest.raises(ValueError, match="budget_bytes"):
        plan(ds, -1)


def test_bench_cpu_table_and_verdicts(capsys):
    import bench_modules

    bench_modules.load("harness")
    b = bench_modules.load("mla")
    assert b.main(["--cpu"]) == 0
    assert "| deepseek-v2 | 69,120 | 4,915,200 | 71.1x |" in capsys.readouterr().out
    dec = [{"kind": "mha", "tokens_per_s": 100.0}, {"kind": "mla", "tokens_per_s": 180.0}]
    kern = [{"heads": 16, "variant": "default", "gbps": 2200.0},
            {"heads": 128, "variant": "default", "tflops": 250.0},
            {"heads": 128, "variant": "v2 (4, 8, 32, 2)", "tflops": 600.0}]  # fmt: skip
    vs = b.verdicts(dec, kern, {"ceiling_gbps": 3000.0}, {"matmul_tflops": 700.0})
    assert [v.status for v in vs] == ["PASS", "PASS", "FAIL"]  # the verdicts judge the default kernel only
    kern += [{"heads": 16, "variant": "v3", "gbps": 2000.0}, {"heads": 128, "variant": "v3", "tflops": 300.0}]
    vs = b.verdicts(dec, kern, {"ceiling_gbps": 3000.0}, {"matmul_tflops": 700.0})
    assert [v.status for v in vs] == ["PASS", "PASS", "FAIL", "FAIL", "PASS"]  # + v3: 67% of copy, 43%
    assert "v3 (candidate default) 128 heads: 300 TFLOP/s = 43%" in vs[-1].text
    assert [name for name, _ in b.kernel_variants("default")] == ["default", "v1", "v2", "v3"]
    sweep = b.kernel_variants("all")
    assert sweep[1] == ("v1", {"version": 1}) and ("v3", {"version": 3}) in sweep
    assert len(sweep) == 4 + len(mla_op.V2_CONFIGS) + len(mla_op.V3_CONFIGS) + 2 + 4


@pytest.mark.parametrize(
    "change,match",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"topk_method": "noaux_tc"}, "topk_method"),
        ({"scoring_func": "sigmoid"}, "scoring_func"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
        ({"num_key_value_heads": 1}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0, "foo": 1}}, "'foo'"),
        ({"qk_rope_head_dim": 5}, "qk_rope_head_dim"),
        ({"n_group": 4}, "n_group"),
    ],
)
def test_config_refusals_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        DeepseekV2Config(**(TINY | change))


def test_dense_model_without_q_lora_and_greedy_router():
    cfg = DeepseekV2Config(**(TINY | {"q_lora_rank": None, "n_routed_experts": None, "rope_scaling": None}))
    model = deepseek.init_random(cfg, seed=1, dtype=np.float64, std=0.3)
    assert "layers.0.self_attn.q_proj.weight" in deepseek.weight_shapes(cfg)
    cfg2 = DeepseekV2Config(**(TINY | {"topk_method": "greedy", "norm_topk_prob": True}))
    m2 = deepseek.init_random(cfg2, seed=1, dtype=np.float64, std=0.3)
    ids, w = m2.blocks[1].mlp.route(np.random.default_rng(0).standard_normal((5, 32)))
    assert ids.shape == (5, 2) and np.allclose(w.sum(-1), 1.0)
    for m in (model, m2):
        toks, rows = greedy(m, make_arena(m), [1, 2, 3, 4, 5], 2)
        assert np.isfinite(rows).all()


# ---- GPU -------------------------------------------------------------------------------------------------


GPU_CASES = [  # (seqs, q_len, heads, contexts, block_size, num_splits)
    (1, 1, 1, [1], 64, None),
    (3, 1, 16, [63, 64, 65], 64, None),
    (2, 1, 7, [1000, 17], 16, None),
    (2, 2, 19, [129, 2], 64, 3),
    (1, 1, 128, [4097], 64, None),
    (4, 1, 128, [300, 1, 77, 1025], 64, 1),
    (2, 3, 40, [200, 5], 32, 7),
    (2, 1, 16, [0, 50], 64, None),
]


def check_kernel(cp, rng, seqs, q_len, heads, ctx, bs, splits, **kernel_args):
    """The fp16 kernel on a poisoned cache (NaN in every slot no context uses) into a poisoned output."""
    qa, qr, data, tables, ctxa = paged_case(rng, seqs, q_len, heads, 512, 64, ctx, bs, np.float16)
    data[..., :] *= np.float16(0.5)
    nb = data.shape[0]
    # poison every slot past each context: the kernel must never read them
    poisoned = data.copy()
    used = np.zeros((nb, bs), bool)
    for s in range(seqs):
        for p in range(ctx[s]):
            used[tables[s, p // bs], p % bs] = True
    poisoned[~used] = np.nan
    g = cp.asarray(poisoned)
    lat, rop = g[..., :512], g[..., 512:]  # the arena's strided views
    ref = mla_decode_ref(qa, qr, data[..., :512], data[..., 512:], tables, ctxa, 0.07)
    out = poison(cp, qa.shape, np.float16)
    got = mla_decode(cp.asarray(qa), cp.asarray(qr), lat, rop, cp.asarray(tables), cp.asarray(ctxa),
                     scale=0.07, num_splits=splits, out=out, **kernel_args)  # fmt: skip
    assert got is out
    assert_close(got, ref, np.float16, f"mla_decode kernel {kernel_args}", rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("seqs,q_len,heads,ctx,bs,splits", GPU_CASES)
def test_gpu_mla_decode_kernel(cp, rng, version, seqs, q_len, heads, ctx, bs, splits):
    check_kernel(cp, rng, seqs, q_len, heads, ctx, bs, splits, version=version)


V2_CASES = [  # every v2 tile config: odd heads, contexts 0 .. 4097, auto and forced splits, q_len 1 .. 3
    (3, 1, 7, [0, 4097, 33], 64, None),
    (2, 2, 19, [129, 2], 16, 5),
    (2, 3, 45, [31, 1], 32, None),
    (1, 1, 128, [2047], 64, 3),
]


@pytest.mark.gpu
@pytest.mark.parametrize("config", mla_op.V2_CONFIGS)
@pytest.mark.parametrize("seqs,q_len,heads,ctx,bs,splits", V2_CASES)
def test_gpu_mla_decode_v2_configs(cp, rng, config, seqs, q_len, heads, ctx, bs, splits):
    check_kernel(cp, rng, seqs, q_len, heads, ctx, bs, splits, version=2, tile_config=config)


# every v3 tile config: contexts 1, 15, 17, 1000, block boundaries, ragged, 16 / 128 heads, forced splits
V3_CASES = [
    (1, 1, 16, [1], 64, None),
    (4, 1, 16, [15, 17, 1000, 64], 64, None),
    (3, 1, 128, [63, 65, 128], 64, 2),
    (2, 1, 128, [1000, 1], 16, None),
    (1, 1, 128, [4097], 64, 3),
    (2, 2, 19, [129, 2], 16, 5),
    (2, 3, 45, [31, 0], 32, 7),
]


@pytest.mark.gpu
@pytest.mark.parametrize("config", mla_op.V3_CONFIGS)
@pytest.mark.parametrize("seqs,q_len,heads,ctx,bs,splits", V3_CASES)
def test_gpu_mla_decode_v3_configs(cp, rng, config, seqs, q_len, heads, ctx, bs, splits):
    check_kernel(cp, rng, seqs, q_len, heads, ctx, bs, splits, version=3, tile_config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("splits", [None, 1, 4, 9])
def test_gpu_mla_decode_v3_default_split_counts(cp, rng, heads, splits):
    """v3's default configs (the bench's shapes, shorter) with automatic and forced split counts; ragged
    contexts around 64-token block and tile boundaries."""
    check_kernel(cp, rng, 5, 1, heads, [2048, 1, 191, 192, 1537], 64, splits, version=3)


@pytest.mark.gpu
@pytest.mark.parametrize("version", [None, 2, 3])
def test_gpu_mla_decode_pdl_chain(cp, rng, version):
    """The default path and v2 / v3 (auto splits: main kernel and combine launched with programmatic
    dependent launch on sm_90) chained: call 2 reads call 1's output as its query, so call 2's main kernel
    (which may start while call 1's combine still runs) must wait in rf::pdl_wait for it."""
    qa, qr, data, tables, ctx = paged_case(rng, 4, 1, 16, 512, 64, [3000, 17, 900, 1], 64, np.float16)
    g = cp.asarray(data)
    lat, rop, t, c = g[..., :512], g[..., 512:], cp.asarray(tables), cp.asarray(ctx)
    qr_g = cp.asarray(qr)
    for _ in range(2):
        q1 = cp.asarray(qa) * cp.float16(4)  # a producer kernel right before call 1
        got1 = mla_decode(q1, qr_g, lat, rop, t, c, scale=0.07, check=False, version=version)
        got2 = mla_decode(got1, qr_g, lat, rop, t, c, scale=0.07, check=False, version=version)
        ref1 = mla_decode_ref(qa * np.float16(4), qr, data[..., :512], data[..., 512:], tables, ctx, 0.07)
        ref2 = mla_decode_ref(cp.asnumpy(got1), qr, data[..., :512], data[..., 512:], tables, ctx, 0.07)
        assert_close(got1, ref1, np.float16, f"mla_decode call 1 (version {version})", rtol=1e-2)
        assert_close(got2, ref2, np.float16, "mla_decode call 2 (query = call 1's output)", rtol=1e-2)


@pytest.mark.gpu
def test_gpu_mla_decode_float32_and_small_dims(cp, rng):
    qa, qr, data, tables, ctx = paged_case(rng, 2, 2, 3, 16, 8, [9, 30], 8, np.float32)
    ref = mla_decode_ref(qa, qr, data[..., :16], data[..., 16:], tables, ctx, 0.2)
    g = cp.asarray(data)
    got = mla_decode(cp.asarray(qa), cp.asarray(qr), g[..., :16], g[..., 16:], cp.asarray(tables),
                     cp.asarray(ctx), scale=0.2)  # fmt: skip
    assert_close(got, ref, np.float32, "mla_decode float32 path", rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gpu_model_matches_transformers(cp, dtype):
    model = load_hf(FIXTURE, dtype=dtype, device="gpu")
    toks, rows = greedy(model, make_arena(model, block_size=8), PROMPT, len(REF["generated"]))
    n = len(PROMPT)
    if dtype == np.float32:
        assert toks == REF["generated"].tolist()
    if dtype == np.float32:
        assert_close(rows[:1], REF["logits"][-1:], np.float32, "GPU logits", rtol=1e-3)
    else:  # fp16: measured max |err| / max |logit| = 1.2e-3 on the H100 (single logits near 0 differ more)
        err = np.abs(rows[:1] - REF["logits"][-1:]).max() / np.abs(REF["logits"][-1:]).max()
        assert err < 5e-3, f"fp16 GPU logits: max error {err:.2e} of max |logit|"
    if dtype == np.float32:
        assert_close(rows[:-1], REF["full_logits"][n - 1 : n - 1 + len(toks)], np.float32, "GPU decode", 1e-3)


@pytest.mark.gpu
def test_gpu_absorbed_kernel_path_matches_expanded(cp):
    """DeepSeek-V2 attention dims (R 512, rope 64: the kernel path) in fp16: absorbed vs expanded decode."""
    cfg = DeepseekV2Config(**(TINY | {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 32,
                                      "v_head_dim": 32, "num_attention_heads": 16,
                                      "hidden_size": 64}))  # fmt: skip
    out = {}
    for absorb in (True, False):
        m = deepseek.init_random(cfg, seed=4, dtype=np.float16, xp=cp, std=0.05)
        m.absorb = absorb
        out[absorb] = greedy(m, make_arena(m, num_blocks=8, block_size=64), list(range(1, 40)), 6)[1]
    assert_close(out[True], out[False], np.float16, "absorbed vs expanded (fp16)", rtol=3e-2)
