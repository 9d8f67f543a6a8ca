"""The training loop: batches -> forward/backward (gradient accumulation) -> clipped AdamW step, with
evaluation, atomic checkpoints, exact resume, a progress bar and a loss curve.

One optimizer step:
    for each of grad_accum micro-batches:
        dp.begin_step(sync=last micro-batch)                  (data parallel only)
        loss = model.loss(x, y, grad_scale=S / grad_accum)    (S: the loss scale, 1 in float32)
        loss.backward(S / grad_accum)                         (grad-ready hooks fire here)
    dp.finish()                                               (gradients averaged over ranks)
    optimizer_step: norm check (skip on overflow), clip, AdamW with lr = cosine_lr(step)

Data parallel (the contract in /work/notes/training_contract.md): `dp` has rank, world_size,
broadcast_parameters(), begin_step(sync), finish(). Every rank draws the same global batch of
batch_size * world_size rows and trains on its slice; only rank 0 writes files and prints.

Outputs in out_dir (rank 0): checkpoints/ (see checkpoint.py), log.jsonl (one line per step),
loss.png (train and held-out loss), summary.json (final train / held-out loss, steps, time).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rawformer import autograd as ag
from rawformer import backend
from rawformer.training.amp import LossScaler, optimizer_step
from rawformer.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from rawformer.training.config import TrainConfig
from rawformer.training.data import BatchSampler, Corpus, eval_batches, load_corpus
from rawformer.training.model import build_model
from rawformer.training.optim import AdamW, cosine_lr

__all__ = ["evaluate", "plot_losses", "resolve_xp", "train"]


def resolve_xp(device: str) -> Any:
    """numpy or cupy for a config's device ("auto": the GPU when CuPy finds one)."""
    if device == "cpu":
        return np
    if device == "gpu":
        return backend.require_cupy()
    return backend.cupy_module() or np


def evaluate(
    model: Any, tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None
) -> tuple[float, int]:
    """Mean next-token loss (nats per byte) over the fixed held-out windows, and the tokens it covered."""
    total, count = 0.0, 0
    with ag.no_grad():
        for x, y in eval_batches(tokens, seq_len, batch_size, max_batches):
            loss = model.loss(x, y)
            n = y.size
            total += loss.item() * n
            count += n
    if count == 0:
        raise ValueError(f"evaluation: the held-out stream ({tokens.size} tokens) is shorter than one window")
    return total / count, count


def plot_losses(path: Path, steps: list[int], losses: list[float], evals: list[tuple[int, float]]) -> None:
    """Train loss per step and held-out loss points, as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, losses, lw=1, label="train")
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def _model_config_json(model: Any) -> dict[str, Any]:
    """config.json of a checkpoint: the config's fields (HF keys, model_type included); a byte-level model
    (vocab 257) names end-of-text 256 as its bos / eos token."""
    d = dataclasses.asdict(model.config)
    if model.config.vocab_size == 257:
        d["eos_token_id"] = d["bos_token_id"] = 256
    return d


class _Progress:
    """A tqdm bar on rank 0 when tqdm is installed and progress is on; else periodic log lines."""

    def __init__(self, total: int, initial: int, enabled: bool, log: Callable[[str], None]) -> None:
        self.bar = None
        self.log = log
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr
                )
            except ImportError:
                self.bar = None

    def update(self, step: int, loss: float, tok_s: float, lr: float, line: bool) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.update(1)
        elif line:
            self.log(f"step {step}: loss {loss:.4f}, {tok_s:,.0f} tokens/s, lr {lr:.3e}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    dp: Any = None,
    dp_factory: Callable[[dict[str, Any]], Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    corpus: Corpus | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train a GPT by `config`, writing checkpoints, logs and the loss curve into out_dir.

    Parameters
    ----------
    config : TrainConfig
    out_dir : output folder (created)
    dp : data-parallel object (module docstring) or None
    dp_factory : instead of dp: called with model.parameters() once the model exists, returns the dp object
        (e.g. rawformer.distributed.DataParallel)
    resume : continue from out_dir/checkpoints/latest when there is one
    progress : show a tqdm bar (rank 0)
    corpus : an already loaded corpus (tests); default: load_corpus by the config
    log : where rank 0's messages go

    Returns
    -------
    summary dict: steps, final_train_loss, held_out_loss, held_out_perplexity, train_time_s,
    tokens_per_s, losses (per step, this run), checkpoint (path), skipped_steps, parameters
    """
    xp = resolve_xp(config.device)
    dtype = np.dtype(config.dtype)
    mcfg = config.model_config()
    model = build_model(mcfg, seed=config.seed, dtype=dtype, xp=xp)
    if dp is None and dp_factory is not None:
        dp = dp_factory(model.parameters())
    rank = int(dp.rank) if dp is not None else 0
    world = int(dp.world_size) if dp is not None else 1
    lead = rank == 0
    say = log if lead else (lambda _msg: None)
    out = Path(out_dir)
    ckpt_root = out / "checkpoints"
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        corpus = load_corpus(
            config.data,
            held_out_fraction=config.held_out_fraction,
            skip_dirs=config.skip_dirs,
            max_files=config.max_files,
        )
    say(corpus.describe())
    optimizer = AdamW(
        model.parameters(),
        lr=config.lr,
        beta1=config.beta1,
        beta2=config.beta2,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
    scaler = LossScaler(
        config.loss_scale, growth_interval=config.loss_scale_growth_interval, enabled=dtype == np.float16
    )
    sampler = BatchSampler(corpus.train, config.seq_len, config.batch_size * world, config.data_seed)
    start = 0
    history: list[dict[str, Any]] = []
    evals: list[tuple[int, float]] = []
    if resume and latest_checkpoint(ckpt_root) is not None:
        ck = load_checkpoint(ckpt_root)
        meta = ck["meta"]
        optimizer.load(ck["weights"], ck["state"], meta["optimizer_steps"])
        scaler.load(meta["scaler"])
        sampler.load(meta["sampler"])
        start = int(meta["step"])
        evals = [tuple(e) for e in meta.get("evals", [])]  # type: ignore[misc]
        say(f"resumed from {ck['path']} at step {start}")
    if dp is not None:
        dp.broadcast_parameters()
    say(
        f"model: {type(model).__name__}, {model.num_parameters():,} parameters, {config.dtype} on "
        f"{'GPU' if xp is not np else 'CPU'}; "
        f"{config.batch_size * world * config.grad_accum} x {config.seq_len} tokens per step"
    )

    # every rank evaluates the windows of one process with the global batch (the same number for any world)
    eval_batch = config.batch_size * world

    def checkpoint(step: int) -> Path | None:
        if not lead:
            return None
        meta = {
            "optimizer_steps": optimizer.step_count,
            "scaler": scaler.state(),
            "sampler": sampler.state(),
            "evals": evals,
            "eval_batch_size": eval_batch,
            "corpus": corpus.fingerprint(),
            "config": config.to_dict(),
        }
        return save_checkpoint(
            ckpt_root,
            step,
            model_config=_model_config_json(model),
            weights=optimizer.weights(),
            state=optimizer.state_arrays(),
            meta=meta,
            keep=config.keep_checkpoints,
        )

    def run_eval(step: int, full_precision: bool = False) -> float:
        # the final evaluation runs the float32 master weights, as `rawformer eval` of the checkpoint does
        full = full_precision and optimizer.masters is not None
        m = type(model)(mcfg, optimizer.weights()) if full else model
        loss, _ = evaluate(m, corpus.held_out, config.seq_len, eval_batch, config.eval_batches)
        evals.append((step, loss))
        say(f"step {step}: held-out loss {loss:.4f} (perplexity {math.exp(loss):.3f})")
        return loss

    bar = _Progress(config.steps, start, progress and lead, say)
    tokens_per_step = config.batch_size * world * config.grad_accum * config.seq_len
    log_file = open(out / "log.jsonl", "a", encoding="utf-8") if lead else None  # noqa: SIM115
    t_start = time.perf_counter()
    step = start
    ckpt_path: Path | None = None
    try:
        while step < config.steps:
            t0 = time.perf_counter()
            lr = cosine_lr(
                step,
                lr=config.lr,
                min_lr=config.min_lr,
                warmup_steps=config.warmup_steps,
                total_steps=config.steps,
            )
            seed_grad = scaler.scale / config.grad_accum
            loss_sum: Any = 0.0
            for micro in range(config.grad_accum):
                x, y = sampler.next()
                rows = slice(rank * config.batch_size, (rank + 1) * config.batch_size)
                if dp is not None:
                    dp.begin_step(micro == config.grad_accum - 1)
                loss = model.loss(x[rows], y[rows], grad_scale=seed_grad)  # host arrays: moved inside
                loss.backward(seed_grad)
                loss_sum = loss_sum + loss.data  # on the device: read once per step, below
            if dp is not None:
                dp.finish()
                # a peer hung inside NCCL shows here, through the watchdog (finish() does not block the
                # host); the grad-norm below waits for the gradients on the host anyway
                dp.synchronize()
            result = optimizer_step(optimizer, scaler, lr=lr, max_grad_norm=config.max_grad_norm)
            step += 1
            dt = time.perf_counter() - t0
            train_loss = float(loss_sum) / config.grad_accum
            tok_s = tokens_per_step / dt
            rec = {
                "step": step,
                "loss": train_loss,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "skipped": result.skipped,
                "loss_scale": scaler.scale,
                "tokens_per_s": tok_s,
            }
            history.append(rec)
            if log_file is not None:
                log_file.write(json.dumps(rec) + "\n")
            bar.update(step, train_loss, tok_s, lr, step % config.log_every == 0)
            elapsed = time.perf_counter() - t_start
            out_of_time = config.max_time_s is not None and elapsed >= config.max_time_s
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                run_eval(step)
            if out_of_time:
                say(f"stopping at step {step}: max_time_s={config.max_time_s} reached")
                break
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                ckpt_path = checkpoint(step)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    train_time = time.perf_counter() - t_start

    held_out = (
        run_eval(step, full_precision=True) if corpus.held_out.size > config.seq_len + 1 else float("nan")
    )
    ckpt_path = checkpoint(step) or ckpt_path
    done = [r for r in history if not r["skipped"]]
    tail = done[-max(1, min(len(done), config.log_every)) :] if done else []
    final_train = float(np.mean([r["loss"] for r in tail])) if tail else float("nan")
    trained_tokens = len(history) * tokens_per_step
    summary = {
        "rank": rank,
        "steps": step,
        "steps_this_run": len(history),
        "final_train_loss": final_train,
        "held_out_loss": held_out,
        "held_out_perplexity": math.exp(held_out) if math.isfinite(held_out) else float("nan"),
        "train_time_s": train_time,
        "tokens_per_s": trained_tokens / train_time if train_time > 0 else 0.0,
        "skipped_steps": scaler.skipped,
        "parameters": model.num_parameters(),
        "checkpoint": str(ckpt_path) if ckpt_path else None,
        "losses": [r["loss"] for r in history],
    }
    if lead:
        all_steps = _read_log_steps(out / "log.jsonl")
        if all_steps:
            try:
                plot_losses(out / "loss.png", [s for s, _ in all_steps], [v for _, v in all_steps], evals)
                summary["plot"] = str(out / "loss.png")
            except ImportError:
                say("matplotlib is not installed: no loss.png (pip install matplotlib)")
        with open(out / "summary.json", "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in summary.items() if k != "losses"}, f, indent=2)
        say(
            f"done: {step} steps ({len(history)} this run) in {train_time:.1f} s, "
            f"{summary['tokens_per_s']:,.0f} tokens/s; final train loss {final_train:.4f} "
            f"(mean of the last {len(tail)} steps), held-out loss {held_out:.4f} "
            f"(perplexity {summary['held_out_perplexity']:.3f}), {scaler.skipped} skipped steps"
        )
        say(f"checkpoint: {ckpt_path}")
    return summary


def _read_log_steps(path: Path) -> list[tuple[int, float]]:
    """(step, loss) of every logged step (a resumed run appends: the last record of a step wins)."""
    if not path.is_file():
        return []
    by_step: dict[int, float] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            by_step[int(rec["step"])] = float(rec["loss"])
    return sorted(by_step.items())
