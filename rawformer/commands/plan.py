"""`rawformer plan`: how many KV blocks and concurrent sequences a memory budget holds, from a config alone.

Per token, the cache keeps (L layers, H_kv key/value heads of D dims, all in the cache dtype):

    fp16 K/V     2 * L * H_kv * D * 2 bytes
    int8 K/V     2 * L * H_kv * (D + 2) bytes         int8 values + one fp16 scale per token and head
    MLA latent   L * (R + D_rope) * 2 bytes           DeepSeek-V2: the kv_lora_rank latent R and the shared
                                                      rope key D_rope (fp16); for a config without MLA the
                                                      row shows a hypothetical conversion (--mla-rank,
                                                      --mla-rope), marked as such

For a DeepSeek-V2 config the fp16 / int8 rows are the K and V of every head it would cache without MLA.
The fp16 and MLA bytes come from rawformer.memory.planner, int8 follows rawformer.ops.kv_int8's layout.

The KV budget is --kv-budget, or --memory (the device's GiB) x --utilization minus the weights (their shapes
from the config, in --dtype) minus --reserve (activations, CUDA graphs, workspace). The pool is carved into
blocks of --block-size tokens; a sequence of context C takes ceil(C / block_size) blocks, so at most
floor(blocks / ceil(C / block_size)) sequences of that length fit at once (the paged pool's waste is at most
one partly filled block per sequence; a contiguous cache would reserve the model's full length for each).
Nothing is loaded: the numbers come from the config.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rawformer.commands._model import PRESETS, preset_config

GiB = 2**30
EPILOG = """examples:
  rawformer plan --preset llama-1b --memory 80
  rawformer plan --config ckpt/config.json --kv-budget 20 --contexts 1024,8192,32768
  rawformer plan --preset gpt2-small --memory 16 --dtype float32 --block-size 32"""


@dataclass(frozen=True)
class Geometry:
    layers: int
    kv_heads: int
    head_dim: int
    max_len: int
    mla: tuple[int, int] | None  # (kv_lora_rank, rope dims) when the model caches a latent


def geometry(cfg: Any) -> Geometry:
    """The cache geometry of a model config (GPT-2, Llama, DeepSeek-V2)."""
    name = type(cfg).__name__
    if name == "GPT2Config":
        return Geometry(cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.n_positions, None)
    if name == "LlamaConfig":
        return Geometry(
            cfg.num_hidden_layers, cfg.kv_heads, int(cfg.head_dim), cfg.max_position_embeddings, None
        )
    if hasattr(cfg, "kv_lora_rank"):
        nh = cfg.num_attention_heads
        dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        longest = getattr(cfg, "max_position_embeddings", 4096)
        return Geometry(cfg.num_hidden_layers, nh, dim, longest, (cfg.kv_lora_rank, cfg.qk_rope_head_dim))
    raise ValueError(f"plan: {name} has no KV cache (an encoder?)")


def weight_bytes(cfg: Any, itemsize: int) -> int:
    from rawformer.models import module_for

    shapes = module_for(cfg).weight_shapes(cfg)
    return itemsize * sum(math.prod(s) for s in shapes.values())


def token_bytes(cfg: Any, mla_rank: int, mla_rope: int) -> dict[str, tuple[int, str]]:
    """Bytes per token of each cache kind, with a note. fp16 and MLA come from rawformer.memory.planner; int8
    is the layout of rawformer.ops.kv_int8 (int8 values + one fp16 scale per token and head)."""
    from rawformer.memory import planner

    g = geometry(cfg)
    if planner.cache_kind(cfg) == "mla":
        dk, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        per_head = " (K and V per head, as without MLA)"
        return {
            "fp16": (planner.mha_bytes_per_token(cfg, "float16"), per_head),
            "int8": (g.layers * g.kv_heads * (dk + 2 + dv + 2), per_head),
            "mla": (planner.kv_bytes_per_token(cfg, "float16"), ""),
        }
    return {
        "fp16": (planner.kv_bytes_per_token(cfg, "float16"), ""),
        "int8": (2 * g.layers * g.kv_heads * (g.head_dim + 2), ""),
        "mla": (
            g.layers * (mla_rank + mla_rope) * 2,
            f" (hypothetical: latent {mla_rank} + rope {mla_rope})",
        ),
    }


def plan(cfg: Any, kv_budget: int, block_size: int, contexts: list[int], mla_rank: int = 512,
         mla_rope: int = 64) -> list[dict[str, Any]]:  # fmt: skip
    """One row per cache kind: bytes per token, blocks, and {context: max concurrent sequences}."""
    g = geometry(cfg)
    rows = []
    for kind, (tb, note) in token_bytes(cfg, mla_rank, mla_rope).items():
        blocks = max(0, kv_budget // (tb * block_size))
        per = {c: blocks // math.ceil(c / block_size) for c in contexts}
        rows.append(dict(cache=kind, note=note, token_bytes=tb, blocks=blocks, tokens=blocks * block_size,
                         max_seqs=per, contiguous_seqs=kv_budget // (tb * g.max_len)))  # fmt: skip
    return rows


def load_config(args: argparse.Namespace) -> Any:
    from rawformer.models import config_from_dict

    if args.preset:
        return preset_config(args.preset)
    if not args.config:
        raise ValueError("plan needs --preset NAME or --config PATH (config.json or a checkpoint directory)")
    p = Path(args.config)
    p = p / "config.json" if p.is_dir() else p
    with open(p, encoding="utf-8") as f:
        return config_from_dict(json.load(f))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="KV blocks and max concurrent sequences for a memory budget (before loading)",
        description=__doc__.split("\n", 1)[1], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="PATH", help="config.json or a checkpoint directory")
    src.add_argument("--preset", choices=sorted(PRESETS), help="a known shape")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--memory", type=float, default=80.0, help="device memory in GiB (default 80: an H100)")
    b.add_argument("--kv-budget", type=float, default=None, help="GiB for the KV cache, directly")
    p.add_argument("--utilization", type=float, default=0.9, help="fraction of --memory to use (default 0.9)")
    p.add_argument("--reserve", type=float, default=2.0, help="GiB kept for activations etc. (default 2)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="weights dtype")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--contexts", default=None, help="context lengths, comma-separated (default: 512 ... max)")
    p.add_argument("--mla-rank", type=int, default=512, help="latent size for the hypothetical MLA row")
    p.add_argument("--mla-rope", type=int, default=64, help="rope dims for the hypothetical MLA row")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    g = geometry(cfg)
    itemsize = 2 if args.dtype == "float16" else 4
    wb = weight_bytes(cfg, itemsize)
    if args.kv_budget is not None:
        budget = int(args.kv_budget * GiB)
    else:
        budget = int(args.memory * args.utilization * GiB - wb - args.reserve * GiB)
        if budget <= 0:
            raise ValueError(
                f"the weights ({wb / GiB:.2f} GiB) and the reserve leave no memory for the KV cache"
            )
    if args.contexts:
        contexts = [int(c) for c in args.contexts.split(",")]
    else:
        contexts = [c for c in (512, 1024, 2048, 4096, 8192, 16384, 32768, 131072) if c < g.max_len] + [
            g.max_len
        ]
    rows = plan(cfg, budget, args.block_size, contexts, args.mla_rank, args.mla_rope)
    if args.json:
        print(
            json.dumps(dict(weights_bytes=wb, kv_budget_bytes=budget, block_size=args.block_size, rows=rows))
        )
        return 0
    print(
        f"{type(cfg).__name__}: {g.layers} layers, {g.kv_heads} kv heads x {g.head_dim}, length {g.max_len}"
    )
    print(f"weights {wb / GiB:.2f} GiB ({args.dtype}); KV {budget / GiB:.2f} GiB; block {args.block_size}")
    head = f"{'cache':<6} {'bytes/token':>11} {'blocks':>9} {'tokens':>10}  " + " ".join(
        f"{c:>7}" for c in contexts
    )
    print("\nmax concurrent sequences per context length (paged):")
    print(head)
    print("-" * len(head))
    for r in rows:
        cols = " ".join(f"{r['max_seqs'][c]:>7}" for c in contexts)
        print(f"{r['cache']:<6} {r['token_bytes']:>11} {r['blocks']:>9} {r['tokens']:>10}  {cols}{r['note']}")
    print(f"\na contiguous cache of the full length ({g.max_len}) holds "
          + ", ".join(f"{r['contiguous_seqs']} ({r['cache']})" for r in rows) + " sequences")  # fmt: skip
    return 0
