"""Training throughput: rawformer (autograd + fused kernels) vs PyTorch eager, the same GPT-2, same run.

    python bench/train.py                      -> bench/results/<gpu>/train.{json,md}
    python bench/train.py --quick              -> $OUT (or bench/out): 3 timed steps
    python bench/train.py --batch 4 --seq 512 --no-torch

Workload (the issue's; model and optimizer settings from rawformer/training/configs/gpt2-small.json):
GPT-2 small (124M, 12 layers, 768 wide, vocab 50257), batch 8 x 1024 tokens, float16
compute, AdamW (lr 6e-4, betas 0.9 / 0.95, weight decay 0.1 on matrices), global-norm clipping at 1.0,
dynamic loss scaling. Both sides start from the same weights (rawformer.training.model.init_weights) and
train on the same random token batches.
- rawformer: float16 parameters with float32 masters (rawformer.training.amp), fused cross-entropy, the
  multi-tensor AdamW kernel, flash attention forward and backward.
- PyTorch eager: float32 parameters, torch.autocast(float16), GradScaler, F.scaled_dot_product_attention
  (is_causal), torch.optim.AdamW (its default foreach implementation), clip_grad_norm_; no torch.compile.
Before timing, the first step's loss of both sides (identical weights and batch) must agree within 2e-2.

Timing: every step ends in a host sync on both sides (the overflow check / clipping norm, and the loss read
back for logging), so steps are timed on the host with perf_counter around each step after `--warmup`
steps; tokens/s = batch x seq / median step time. Peak memory: rawformer's peak bytes in use in CuPy's pool
(rawformer.memory.AllocatorStats over two extra steps, model and optimizer state included) and the pool's
reserved total; torch's max_memory_allocated / max_memory_reserved over its run.

Acceptance (the issue): rawformer tokens/s >= 0.8x PyTorch eager's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

import harness
import numpy as np
from rawformer.models import GPT2Config

from rawformer.memory.tracker import AllocatorStats
from rawformer.training.amp import LossScaler, optimizer_step
from rawformer.training.config import TrainConfig, config_path
from rawformer.training.model import GPT, init_weights
from rawformer.training.optim import AdamW

# The training configs benchmarked: model shape and optimizer settings come from the JSON file (the same one
# `rawformer train --config` reads); batch and sequence length from --batch / --seq (the 8 x 1024).
HPARAMS = {name: TrainConfig.from_json(config_path(name)) for name in ("gpt2-small",)}  # shipped configs
CONFIGS = {name: cfg.model_config() for name, cfg in HPARAMS.items()}
ACCEPT = 0.8
LOSS_TOL = 2e-2
LR, BETAS, WD, CLIP = (
    HPARAMS["gpt2-small"].lr,
    (HPARAMS["gpt2-small"].beta1, HPARAMS["gpt2-small"].beta2),
    HPARAMS["gpt2-small"].weight_decay,
    HPARAMS["gpt2-small"].max_grad_norm,
)


def batches(
    cfg: GPT2Config, batch: int, seq: int, count: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        rows = rng.integers(0, cfg.vocab_size, (batch, seq + 1))
        out.append((rows[:, :-1], rows[:, 1:]))
    return out


def step_flops(cfg: GPT2Config, batch: int, seq: int) -> int:
    """Training FLOPs of one step: 6 per parameter per token (matrices and the tied head) plus attention's
    scores and weighted sum, 6 * 2 * seq * n_embd per token per layer for forward + backward (causal
    counted in full, as the usual MFU formula does)."""
    h, v, layers = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    matrices = layers * (4 * h * h + 2 * h * cfg.inner) + v * h
    tokens = batch * seq
    return int(6 * matrices * tokens + 12 * layers * seq * h * tokens)


# ---- rawformer ---------------------------------------------------------------------------------------------


def run_rawformer(
    cfg: GPT2Config, host: dict[str, np.ndarray], data: list, args: argparse.Namespace, cp: Any
):
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    model = GPT(cfg, {n: cp.asarray(w.astype(np.float16)) for n, w in host.items()})
    opt = AdamW(model.parameters(), lr=LR, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WD)
    scaler = LossScaler(2.0**16, growth_interval=2000)

    def step(i: int) -> float:
        x, y = data[i % len(data)]
        loss = model.loss(x, y, grad_scale=scaler.scale)
        loss.backward(scaler.scale)
        optimizer_step(opt, scaler, lr=LR, max_grad_norm=CLIP)
        return float(loss.data)  # read back for logging, as a training loop does

    first = step(0)
    times = []
    for i in range(1, 1 + args.warmup + args.steps):
        t0 = time.perf_counter()
        step(i)
        cp.cuda.get_current_stream().synchronize()
        if i > args.warmup:
            times.append(time.perf_counter() - t0)
    with AllocatorStats() as mem:
        for i in range(2):
            step(i)
        cp.cuda.get_current_stream().synchronize()
    peak = mem.base_bytes + mem.peak_bytes
    return first, times, {"peak_bytes": peak, "reserved_bytes": pool.total_bytes(), "skipped": scaler.skipped}


# ---- PyTorch eager -----------------------------------------------------------------------------------------


def torch_model(torch: Any, cfg: GPT2Config, host: dict[str, np.ndarray]) -> Any:
    nn, F = torch.nn, torch.nn.functional
    h, nh = cfg.n_embd, cfg.n_head

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            eps = cfg.layer_norm_epsilon
            self.ln_1, self.ln_2 = nn.LayerNorm(h, eps=eps), nn.LayerNorm(h, eps=eps)
            self.c_attn, self.attn_proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
            self.c_fc, self.mlp_proj = nn.Linear(h, cfg.inner), nn.Linear(cfg.inner, h)

        def forward(self, x: Any) -> Any:
            b, t, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=2)
            q, k, v = (z.view(b, t, nh, h // nh).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hd)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, h)
            x = x + self.attn_proj(a)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(cfg.vocab_size, h), nn.Embedding(cfg.n_positions, h)
            self.h = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(h, eps=cfg.layer_norm_epsilon)

        def forward(self, ids: Any, targets: Any) -> Any:
            pos = torch.arange(ids.shape[1], device=ids.device)
            x = self.wte(ids) + self.wpe(pos)
            for blk in self.h:
                x = blk(x)
            logits = self.ln_f(x) @ self.wte.weight.T  # tied head
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))

    m = Model().cuda()
    names = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.c_attn": "c_attn", "attn.c_proj": "attn_proj",
             "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp_proj"}  # fmt: skip
    with torch.no_grad():
        m.wte.weight.copy_(torch.from_numpy(host["wte.weight"]))
        m.wpe.weight.copy_(torch.from_numpy(host["wpe.weight"]))
        m.ln_f.weight.copy_(torch.from_numpy(host["ln_f.weight"]))
        m.ln_f.bias.copy_(torch.from_numpy(host["ln_f.bias"]))
        for i, blk in enumerate(m.h):
            for ours, theirs in names.items():
                mod = getattr(blk, theirs)
                w = host[f"h.{i}.{ours}.weight"]
                mod.weight.copy_(torch.from_numpy(w.T.copy() if w.ndim == 2 else w))  # Conv1D (in, out)
                mod.bias.copy_(torch.from_numpy(host[f"h.{i}.{ours}.bias"]))
    return m


def run_torch(torch: Any, cfg: GPT2Config, host: dict, data: list, args: argparse.Namespace) -> tuple:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = torch_model(torch, cfg, host)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": other, "weight_decay": 0.0}], lr=LR, betas=BETAS
    )
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16, growth_interval=2000)
    dev_data = [(torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()) for x, y in data]

    def step(i: int) -> float:
        x, y = dev_data[i % len(dev_data)]
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = step(0)
    times = []
    for i in range(1, 1 + args.warmup + args.steps):
        t0 = time.perf_counter()
        step(i)
        torch.cuda.synchronize()
        if i > args.warmup:
            times.append(time.perf_counter() - t0)
    mem = {
        "peak_bytes": torch.cuda.max_memory_allocated(),
        "reserved_bytes": torch.cuda.max_memory_reserved(),
    }
    return first, times, mem


# ---- main --------------------------------------------------------------------------------------------------


def record(
    impl: str, name: str, args: argparse.Namespace, times: list[float], flops: int, extra: dict
) -> dict:
    timing = harness.Timing(tuple(1e3 * t for t in times))
    rec = harness.make_record(
        op="train step", direction="fwd+bwd+adamw", impl=impl, config=name, shape=(args.batch, args.seq),
        dtype="float16", nbytes=0, flops=flops, ceiling_gbps=0.0, timing=timing,
    )  # fmt: skip
    rec["tokens_per_s"] = args.batch * args.seq / (timing.median / 1e3)
    rec.update(extra)
    return rec


def markdown(header: dict, records: list[dict], checks: dict, verdicts: list) -> str:
    lines = [
        "# Training throughput: rawformer vs PyTorch eager",
        "",
        f"- GPU: {header['gpu']}; date {header['date']}; commit {header['commit']}"
        + (" (uncommitted changes)" if header.get("dirty") else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()),
        f"- workload: {header['workload']}",
        "",
        "| config | impl | step ms (median) | tokens/s | TFLOP/s | peak in use | reserved | first loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['config']} | {r['impl']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | "
            f"{r['peak_bytes'] / 2**30:.2f} GiB | {r['reserved_bytes'] / 2**30:.2f} GiB | "
            f"{r['first_loss']:.4f} |"
        )
    lines += ["", f"Checks: {checks}", "", *harness.acceptance_lines(verdicts)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", type=harness.list_arg(list(CONFIGS), "config"), default=list(CONFIGS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after the first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--quick", action="store_true", help="3 timed steps, results into $OUT")
    p.add_argument("--out", metavar="DIR")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 3, 2
    cp = harness.require_gpu("train.py")
    device = harness.device_header(cp)
    torch = None if args.no_torch else harness.import_torch(cp)
    records, checks = [], {}
    for name in args.configs:
        cfg = CONFIGS[name]
        if args.seq > cfg.n_positions:
            raise SystemExit(f"train.py: --seq {args.seq} exceeds n_positions {cfg.n_positions}")
        host = init_weights(cfg, seed=args.seed)
        data = batches(cfg, args.batch, args.seq, 4, args.seed + 1)
        flops = step_flops(cfg, args.batch, args.seq)
        harness.log(f"{name}: rawformer ...")
        first, times, mem = run_rawformer(cfg, host, data, args, cp)
        records.append(record("rawformer", name, args, times, flops, {**mem, "first_loss": first}))
        harness.log(f"  {records[-1]['tokens_per_s']:,.0f} tokens/s, {records[-1]['ms']:.1f} ms/step, "
                    f"peak {mem['peak_bytes'] / 2**30:.2f} GiB")  # fmt: skip
        cp.get_default_memory_pool().free_all_blocks()
        if torch is not None:
            harness.log(f"{name}: PyTorch eager ...")
            t_first, t_times, t_mem = run_torch(torch, cfg, host, data, args)
            records.append(record("torch", name, args, t_times, flops, {**t_mem, "first_loss": t_first}))
            harness.log(f"  {records[-1]['tokens_per_s']:,.0f} tokens/s, {records[-1]['ms']:.1f} ms/step, "
                        f"peak {t_mem['peak_bytes'] / 2**30:.2f} GiB")  # fmt: skip
            err = abs(first - t_first) / abs(t_first)
            checks[name] = {"first_loss_rel_diff": err, "ok": err <= LOSS_TOL}
            if err > LOSS_TOL:  # a different model is not a fair race: mark rawformer's record wrong
                records[-2]["status"] = "wrong"
                records[-2]["message"] = f"first loss {first:.4f} vs torch {t_first:.4f}"
    crit = [harness.Criterion("train step", "fwd+bwd+adamw", "faster", ACCEPT, "rawformer", "torch")]
    verdicts = harness.evaluate(crit, records)
    header = harness.run_header(
        device,
        workload={"batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
                  "dtype": "float16", "lr": LR, "betas": BETAS, "weight_decay": WD, "clip": CLIP},
        configs={k: dataclasses.asdict(CONFIGS[k]) for k in args.configs},
    )  # fmt: skip
    out_dir = harness.output_dir(device["gpu_slug"], args.quick, args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    harness.write_json(out_dir / "train.json", {**header, "checks": checks}, records)
    (out_dir / "train.md").write_text(markdown(header, records, checks, verdicts))
    harness.copy_to_out(out_dir, ["train.json", "train.md"], args.quick, args.out)
    print()
    for r in records:
        gib = 2**30
        print(
            f"{r['impl']:>10} {r['config']}: {r['tokens_per_s']:,.0f} tokens/s ({r['ms']:.1f} ms/step), "
            f"peak {r['peak_bytes'] / gib:.2f} GiB in use, {r['reserved_bytes'] / gib:.2f} GiB reserved"
        )
    for line in harness.acceptance_lines(verdicts):
        print(line)
    harness.log(f"wrote {out_dir / 'train.json'}, {out_dir / 'train.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
