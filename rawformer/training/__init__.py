"""Training on rawformer.autograd: GPT-2 / Llama models, AdamW, mixed precision, data, checkpoints, the loop.

    from rawformer.training import TrainConfig, train
    summary = train(TrainConfig.from_json("tiny"), "runs/tiny")

Modules, in the order a step uses them: data (byte-level stdlib corpus, batches), model (GPT, Llama on
autograd), optim (AdamW, clipping, schedule), amp (loss scaling, the optimizer step), checkpoint (atomic
safetensors), loop (train, evaluate), config (TrainConfig).
"""

from rawformer.training.amp import LossScaler, optimizer_step
from rawformer.training.checkpoint import load_checkpoint, save_checkpoint
from rawformer.training.config import TrainConfig
from rawformer.training.data import load_corpus
from rawformer.training.loop import evaluate, train
from rawformer.training.model import GPT, Llama, build_model
from rawformer.training.optim import AdamW, cosine_lr

__all__ = [
    "GPT",
    "AdamW",
    "Llama",
    "LossScaler",
    "TrainConfig",
    "build_model",
    "cosine_lr",
    "evaluate",
    "load_checkpoint",
    "load_corpus",
    "optimizer_step",
    "save_checkpoint",
    "train",
]
