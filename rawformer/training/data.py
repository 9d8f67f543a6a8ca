"""Byte-level training data: the running interpreter's standard library sources, read at run time.

The corpus is every `*.py` file under `sysconfig.get_paths()["stdlib"]` (present on every machine with
Python; never committed), minus installed packages (site-packages, dist-packages) and any directory named
in `skip_dirs`, sorted by relative path. Each file becomes its bytes followed by the end-of-text id 256
(ByteTokenizer). The split is by file and deterministic: a file is held out when crc32 of its relative path
falls in the held-out fraction, so the split does not depend on which other files exist.

Batches: `BatchSampler` draws random windows of seq_len + 1 tokens (inputs and next-token targets) with a
NumPy PCG64 generator; its state (and the count of batches drawn) is the data position a checkpoint stores,
so a resumed run draws exactly the batches the uninterrupted run would. Evaluation reads fixed windows
(`eval_batches`): non-overlapping, from the start of the held-out stream.
"""

from __future__ import annotations

import platform
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rawformer.export.tokenizer import ByteTokenizer

__all__ = ["BatchSampler", "Corpus", "eval_batches", "load_corpus", "source_files", "stdlib_root"]

EOT = ByteTokenizer.EOT
_INSTALLED = ("site-packages", "dist-packages")


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: str | Path | None = None, skip_dirs: Sequence[str] = ()) -> list[Path]:
    """Every *.py file under `root` (default: the stdlib), without installed packages and `skip_dirs`
    (directory names, anywhere in the relative path), sorted by relative POSIX path."""
    base = stdlib_root() if root is None else Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"corpus folder {base} does not exist")
    skip = set(_INSTALLED) | set(skip_dirs)
    files = []
    for f in base.rglob("*.py"):
        rel = f.relative_to(base)
        if skip.intersection(rel.parts[:-1]) or not f.is_file():
            continue
        files.append((rel.as_posix(), f))
    files.sort()
    return [f for _, f in files]


def _held_out(rel: str, fraction: float) -> bool:
    return zlib.crc32(rel.encode("utf-8")) % 10_000 < round(fraction * 10_000)


@dataclass
class Corpus:
    """Token streams (uint16: bytes 0..255 and EOT 256) of the train and held-out files."""

    train: np.ndarray
    held_out: np.ndarray
    train_files: int
    held_out_files: int
    root: str

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the held-out set (its files come from this interpreter's stdlib): file and token
        counts, a crc32 of its tokens, the Python version. Stored with checkpoints so `rawformer eval` can
        tell whether it is scoring the same held-out data."""
        return {
            "held_out_files": self.held_out_files,
            "held_out_tokens": int(self.held_out.size),
            "held_out_crc32": zlib.crc32(self.held_out.tobytes()),
            "python": platform.python_version(),
        }

    def describe(self) -> str:
        return (
            f"corpus {self.root}: {self.train_files} train files ({self.train.size:,} tokens), "
            f"{self.held_out_files} held-out files ({self.held_out.size:,} tokens)"
        )


def _stream(files: list[Path]) -> np.ndarray:
    parts = []
    for f in files:
        parts.append(np.frombuffer(f.read_bytes(), dtype=np.uint8).astype(np.uint16))
        parts.append(np.array([EOT], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def load_corpus(
    root: str | Path | None = None,
    *,
    held_out_fraction: float = 0.05,
    skip_dirs: Sequence[str] = (),
    max_files: int | None = None,
) -> Corpus:
    """Read the corpus and split it by file (module docstring).

    Parameters
    ----------
    root : folder of *.py files; None (or "stdlib") for the interpreter's standard library
    held_out_fraction : share of files held out, by crc32 of the relative path, in [0, 1)
    skip_dirs : directory names to leave out (e.g. ["test", "tests"])
    max_files : only the first max_files files of the sorted list (small test corpora)
    """
    if not 0 <= held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    base = stdlib_root() if root in (None, "stdlib") else Path(root)  # type: ignore[arg-type]
    files = source_files(base, skip_dirs)
    if max_files is not None:
        files = files[: int(max_files)]
    if not files:
        raise ValueError(f"no *.py files under {base}")
    rels = [f.relative_to(base).as_posix() for f in files]
    held = [f for f, r in zip(files, rels, strict=True) if _held_out(r, held_out_fraction)]
    train = [f for f, r in zip(files, rels, strict=True) if not _held_out(r, held_out_fraction)]
    return Corpus(_stream(train), _stream(held), len(train), len(held), str(base))


class BatchSampler:
    """Random (inputs, targets) windows of a token stream, reproducible from a seed and resumable.

    Parameters
    ----------
    tokens : 1-D token stream (longer than seq_len + 1)
    seq_len : tokens per row
    batch_size : rows per batch (the global batch: data-parallel ranks take slices)
    seed : generator seed
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        if tokens.ndim != 1 or tokens.size < seq_len + 2:
            raise ValueError(f"BatchSampler: need a 1-D stream longer than {seq_len + 1} tokens")
        self.tokens, self.seq_len, self.batch_size = tokens, int(seq_len), int(batch_size)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.drawn = 0

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """int64 (batch, seq_len) inputs and their next-token targets."""
        starts = self.rng.integers(0, self.tokens.size - self.seq_len - 1, size=self.batch_size)
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]  # (B, T + 1)
        rows = self.tokens[idx].astype(np.int64)
        self.drawn += 1
        return rows[:, :-1], rows[:, 1:]

    def state(self) -> dict[str, Any]:
        """JSON-able position: the generator's state and batches drawn."""
        return {"bit_generator": self.rng.bit_generator.state, "drawn": self.drawn}

    def load(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
        self.drawn = int(state["drawn"])


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Fixed evaluation batches: non-overlapping windows of seq_len + 1 tokens from the start of the stream
    (stride seq_len), batch_size per batch (the last may be smaller), at most max_batches batches."""
    windows = (tokens.size - 1) // seq_len
    if max_batches is not None:
        windows = min(windows, int(max_batches) * batch_size)
    for first in range(0, windows, batch_size):
        n = min(batch_size, windows - first)
        starts = (first + np.arange(n)) * seq_len
        rows = tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int64)
        yield rows[:, :-1], rows[:, 1:]
