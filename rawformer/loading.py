"""`rawformer.load`: one entry point for ONNX files and Hugging Face checkpoint directories.

    m = rawformer.load("model.onnx")                 # recognised GPT-2 / Llama / BERT -> the native model
    m.path_taken                                     # "native", "executor" or "hf"
    m.logits([[1, 2, 3]])                            # (B, S, V) logits of token ids
    m.generate([[1, 2, 3]], max_new_tokens=20)       # greedy by default; a rawformer.runtime.Generation
    m = rawformer.load("model.onnx", native=False)   # always the graph executor
    m = rawformer.load("checkpoint-dir")             # config.json + safetensors via rawformer.export.load_hf
    m = rawformer.load("model.onnx", quantize="int8")  # weight-only INT8 (models.quantize_model; "int8-g128")
    m = rawformer.load("qdq.onnx")                    # an INT8 QDQ file: its int8 values, as stored

The ONNX route: read_onnx (safety checks) -> recognise (structure, then a probe run comparing the native model
with the graph executor) -> the native model on the target device and dtype, which gets the fused kernels,
the paged KV cache and CUDA-graph decoding of rawformer.runtime. A graph that is not recognised runs in the
OnnxExecutor; `reason` says why it was not recognised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rawformer import backend

__all__ = ["LoadedModel", "load"]

_STORED = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.float64): "F64"}


@dataclass
class LoadedModel:
    """What `load` returns.

    path_taken : "native" (ONNX weights imported into a rawformer model), "executor" (the ONNX graph run
        node by node) or "hf" (a Hugging Face checkpoint directory)
    model : the native model (GPT2Model, LlamaModel, BertModel) or the OnnxExecutor
    family : "gpt2", "llama", "bert", or None for an unrecognised graph
    config : the native config (None on the executor path)
    reason : why an ONNX graph runs in the executor (None otherwise)
    source : the file or directory loaded
    """

    path_taken: str
    model: Any
    family: str | None
    config: Any
    reason: str | None
    source: Path

    @property
    def xp(self) -> Any:
        return self.model.xp

    @property
    def is_decoder(self) -> bool:
        if self.path_taken != "executor":
            from rawformer.models import BertModel

            return not isinstance(self.model, BertModel)  # the encoder; the others run over the KV cache
        return "input_ids" in self.model.input_names and "logits" in self.model.output_names[0]

    def _ids(self, ids: Any) -> np.ndarray:
        a = np.asarray(backend.to_numpy(ids) if backend.is_cupy(ids) else ids)
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or (a.size and a.dtype.kind not in "iu"):
            raise ValueError(f"token ids must be an int (batch, seq) array, got {a.dtype} {a.shape}")
        return a.astype(np.int64)

    def logits(self, input_ids: Any, **inputs: Any) -> Any:
        """Outputs for token ids (B, S) (a 1-D list is one row): decoders (B, S, vocab) logits, BERT (B, S, H)
        hidden states. Extra inputs (attention_mask, token_type_ids) go to BERT / the executor."""
        ids = self._ids(input_ids)
        if self.path_taken == "executor":
            from rawformer.export.onnx_executor import default_feeds

            feeds = default_feeds(self.model.model.inputs, ids, inputs)
            return self.model.run(feeds)[self.model.output_names[0]]
        if not self.is_decoder:
            return self.model.forward(ids, inputs.get("attention_mask"), inputs.get("token_type_ids"))
        from rawformer.export.onnx_import import native_logits

        return native_logits(self.model, ids)

    def generate(self, prompts: Any, max_new_tokens: int = 32, **kw: Any) -> Any:
        """Generation: on the native path rawformer.runtime.generate (all its options: temperature, top_p,
        stop, ...); on the executor path greedy decoding that re-runs the graph over the whole sequence
        each step (token-id prompts; sampling options are refused). Returns a rawformer.runtime.Generation."""
        from rawformer.runtime.generate import Generation, GenerationResult, encode_prompts, generate

        if not self.is_decoder:
            raise TypeError(f"generate: {self.source} is an encoder ({self.family}), not a decoder")
        if self.path_taken != "executor":
            return generate(self.model, prompts, max_new_tokens, **kw)
        extra = {k: v for k, v in kw.items() if not (k == "temperature" and v == 0) and k != "ignore_eos"}
        stop = extra.pop("stop", None)
        if extra:
            raise ValueError(
                f"generate on the executor path is greedy only; unsupported options {sorted(extra)}"
            )
        stops = {int(stop)} if isinstance(stop, (int, np.integer)) else set(stop or [])
        results = []
        for p in encode_prompts(prompts):
            seq = list(p)
            toks: list[int] = []
            reason = "length"
            for _ in range(int(max_new_tokens)):
                lg = self.logits(np.asarray([seq], dtype=np.int64))
                t = int(np.argmax(backend.to_numpy(lg[0, -1])))
                toks.append(t)
                seq.append(t)
                if t in stops:
                    reason = "stop_token"
                    break
            results.append(GenerationResult(list(p), toks, None, reason))
        return Generation(results, {"path": "executor"})

    def embed(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None, **kw: Any) -> Any:
        """BERT sentence embeddings (native path): BertModel.embed."""
        if self.path_taken == "executor" or self.is_decoder:
            raise TypeError("embed needs a BERT model on the native path")
        return self.model.embed(input_ids, attention_mask, token_type_ids, **kw)


def _quantized(model: Any, mode: str | None, source: Path) -> Any:
    """models.quantize_model(model, mode) with load's errors; a model already in `mode` (QDQ) is kept."""
    if mode is None:
        return model
    from rawformer.models.quantize import _BLOCK_MATRICES, quantize_model

    done = getattr(model, "quantization", None)
    if done == mode:
        return model
    if done:
        raise ValueError(f"load: {source} is already quantized ({done}); it cannot be quantized as {mode!r}")
    if type(model).__name__ not in _BLOCK_MATRICES:
        raise ValueError(
            f"load: quantize={mode!r}: {type(model).__name__} has no quantization plan "
            f"(models.quantize covers {', '.join(_BLOCK_MATRICES)})"
        )
    return quantize_model(model, mode)


def load(
    path: str | os.PathLike, *, native: bool | None = None, dtype: Any = None, device: str = "auto",
    verify: bool = True, quantize: str | None = None,
) -> LoadedModel:  # fmt: skip
    """Load an ONNX file or a Hugging Face checkpoint directory.

    Parameters
    ----------
    path : a .onnx file, or a directory with config.json + model.safetensors (or shards)
    native : ONNX only. None: the native model when the graph is recognised, else the executor; False:
        always the executor; True: the native model or NotRecognised (a ValueError) saying why not
    dtype : float16 / float32 on the GPU, float32 / float64 on the CPU; None: the stored precision (as
        load_hf: float32 files stay float32, float16 ones float16 on the GPU and float32 on the CPU)
    device : "auto" (the GPU when CuPy finds one), "cpu" or "gpu"
    verify : ONNX only: check the native model against the executor on 5 probe tokens before trusting the
        match (on the CPU, in float64 up to 1.5e9 parameters: it holds two float64 copies of the weights
        for a moment; False skips it and trusts the structure alone)
    quantize : None, "int8" (per output channel) or "int8-g128" (128 inputs per scale): weight-only INT8 of
        the native model after it is built (models.quantize_model: the block projections and the lm head;
        fp16 / fp32 activations). Native models only: ValueError for the executor path (native=False or an
        unrecognised graph) and for models without a quantization plan. A file that is already INT8 (QDQ)
        loads quantized without it; asking for its own mode again is allowed, another mode is refused.

    Returns
    -------
    LoadedModel (path_taken, model, family, config, reason; logits, generate, embed)
    """
    from rawformer.export.hf import _device, _target_dtype, load_hf

    p = Path(path)
    if quantize is not None:
        from rawformer.models.quantize import parse_mode

        parse_mode(quantize)  # ValueError naming the modes, before any loading
        if native is False:
            raise ValueError(
                f"load: quantize={quantize!r} needs the native path; native=False runs the executor"
            )
    gpu = _device(device)
    if p.is_dir():
        if native is False:
            raise ValueError(f"load: native=False applies to ONNX files; {p} is a checkpoint directory")
        m = _quantized(load_hf(p, dtype=dtype, device=device), quantize, p)
        return LoadedModel("hf", m, m.config.model_type, m.config, None, p)
    if not p.exists():
        raise FileNotFoundError(f"load: no such file or directory {p}")
    if p.suffix.lower() != ".onnx":
        raise ValueError(f"load: {p} is neither a .onnx file nor a checkpoint directory")
    from rawformer.export.onnx_executor import OnnxExecutor
    from rawformer.export.onnx_file import read_onnx
    from rawformer.export.onnx_import import NotRecognised, build_native, recognise

    onnx_model = read_onnx(p)
    stored = {
        _STORED.get(np.dtype(a.dtype), "F32") for a in onnx_model.initializers.values() if a.dtype.kind == "f"
    }
    target = _target_dtype(dtype, stored or {"F32"}, gpu)
    reason = "native=False" if native is False else None
    if native is not False:
        try:
            config, match = recognise(onnx_model, verify=verify)
        except NotRecognised as e:
            if native:
                raise
            reason = str(e)
        else:
            xp = backend.require_cupy() if gpu else np
            weights = {k: xp.asarray(np.ascontiguousarray(v, dtype=target)) for k, v in match.weights.items()}
            model = _quantized(build_native(config, match, weights, xp), quantize, p)
            return LoadedModel("native", model, match.family, config, None, p)
    if quantize is not None:
        raise ValueError(
            f"load: quantize={quantize!r} needs a native model, but {p} runs in the graph executor ({reason})"
        )
    ex = OnnxExecutor(onnx_model, device="gpu" if gpu else "cpu", dtype=target)
    return LoadedModel("executor", ex, None, None, reason, p)
