"""Recognise GPT-2-, Llama- and BERT-shaped ONNX graphs by their structure and import their weights into the
native models (rawformer.models), which then run the fused kernels and the paged KV cache.

Names in an exported graph say little (torch.onnx's dynamo exporter renames transposed weights to `val_112`),
so no weight or node name is read. The graph is reduced to a sequence of parameter events in topological
order:

    E  a Gather from a 2-D constant, or Slice(table, 0, S): an embedding / position table
    N  LayerNormalization (scale, bias, eps), or onnxruntime's SkipLayerNormalization
    R  an RMS norm: ReduceMean of x^2 ... Mul by a (H,) constant, or (Skip)SimplifiedLayerNormalization
    L  a linear: MatMul / Gemm with a constant 2-D weight, with the 1-D constant bias added after it (or
       taken by the BiasGelu / FastGelu / skip norm that follows)
    S  Softmax (one per attention)
    M  EmbedLayerNormalization, A  com.microsoft Attention (the fused ops of onnxruntime's optimizer)

and each family is a regular expression over the letters after the embeddings:

    GPT-2         (N L S L N L L){n} N L          pre-LN, fused q|k|v, tied head
    Llama         (R L L L S L R L L L){n} R L    pre-RMSNorm, separate q, k, v (GQA: k narrower), SwiGLU
    BERT          N (L L L S L N L L N){n}        post-LN encoder, three embeddings
    BERT (fused)  M (A L N L L N){n}              the same after onnxruntime's transformer optimizer

Roles that order cannot tell apart come from the data flow: q is the linear that reaches the left operand
of the attention scores' MatMul, k the right one, v the other; the SwiGLU gate is the linear that reaches a
Sigmoid; BERT's word / token-type embeddings are the Gathers whose indices come from the graph inputs
input_ids / token_type_ids; the GELU is the tanh form when a Tanh / FastGelu follows. Sizes come from the
weight shapes; the head count from the Softmax input's shape in a probe run of the graph executor (or from
Attention's num_heads); epsilons from the norm nodes; the RoPE theta from the 1-D constant the Cos nodes
are computed from (and when that table is not theta's, e.g. Llama 3 scaling, the native model uses it).

A match is then verified: the native model and the executor run the same 5 probe tokens in float64 and
must agree to 1e-5 relative (a faithful import agrees to ~1e-8; a wrong GELU form or an untied head shows
as ~1e-4 or more). Models above 1.5e9 parameters are probed in float32 (tolerance 1e-3) to bound the
host memory; verify=False skips the probe. Only a verified match is "recognised"; anything else raises
NotRecognised with the reason, and the loader falls back to the executor.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rawformer.export.onnx_executor import OnnxExecutor, default_feeds
from rawformer.export.onnx_file import OnnxModel
from rawformer.export.onnx_qdq import attach_quantized, fold_dq, quantized_from
from rawformer.models import BertConfig, GPT2Config, LlamaConfig, build_model, llama_inv_freq

__all__ = ["Match", "NotRecognised", "build_native", "match_structure", "native_logits", "recognise"]

VERIFY_RTOL = {np.dtype(np.float64): 1e-5, np.dtype(np.float32): 1e-3}  # faithful imports: ~1e-8 / ~1e-6
FP16_FILE_RTOL = 1e-4
# a float16 QDQ file (DequantizeLinear -> float16 weights): the executor runs the dequantized weights in
# float16 and rounds the activations that meet them, so its float64 probe carries float16 rounding (~1e-3
# seen on the test models); float32 QDQ files keep the 1e-5 probe
VERIFY_RTOL_QDQ_F16 = 5e-3
PROBE_F64_MAX_PARAMS = 1_500_000_000  # above this the probe runs in float32 (float64 copies of every weight
# twice, executor and native model, would need 24+ GB of host memory)
PROBE_TOKENS = 5
LLAMA_MAX_POSITIONS = 4096  # Llama graphs do not say; the runtime's longest sequence defaults to it


class NotRecognised(ValueError):
    """The graph is not one of the native families (the message says why)."""


@dataclass
class _Event:
    kind: str  # E N R L S
    node: Any
    weight: np.ndarray | None = None  # L: (in, out); E: the table; N / R: the scale
    bias: np.ndarray | None = None  # L / N
    eps: float | None = None  # N / R
    out: str = ""  # L: the value after the bias add
    lin_bias: np.ndarray | None = None  # fused skip norms: the bias of the linear before them
    quant: Any = None  # L: the QuantizedWeight of a DequantizeLinear(int8) weight (export/onnx_qdq.py)


@dataclass
class Match:
    """A structural match: the family, the config (heads filled in by `recognise`), HF-named weights."""

    family: str
    config: Any
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    softmax_inputs: list[str] = field(default_factory=list)
    heads: int | None = None  # known from the graph (com.microsoft Attention's num_heads)
    probe_error: float | None = None  # max relative difference native vs executor on the float64 probe
    inv_freq: np.ndarray | None = None  # Llama: a RoPE table the config's theta does not give (scaling)
    quant: dict[str, Any] = field(default_factory=dict)  # HF weight name -> QuantizedWeight (QDQ files)
    float_head: np.ndarray | None = None  # GPT-2 QDQ: the graph's dequantized head (H, V), for the probe


class _Graph:
    """Producer / consumer maps and constant lookup over a checked OnnxModel."""

    def __init__(self, m: OnnxModel) -> None:
        self.m = m
        self.producer = {o: n for n in m.nodes for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in m.nodes:
            for x in n.input:
                self.consumers.setdefault(x, []).append(n)

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant: an initializer or a Constant node, seen through at most 16 Identity /
        Cast / Transpose nodes (iteratively: a long chain in a hostile file cannot exhaust the stack)."""
        chain = []
        for _ in range(16):
            if name in self.m.initializers:
                v = self.m.initializers[name]
                break
            p = self.producer.get(name)
            if p is None:
                return None
            if p.op_type == "Constant":
                t = [a.t for a in p.attribute if a.name == "value" and a.HasField("t")]
                if not t:
                    return None
                from rawformer.export.onnx_file import tensor_to_array

                v = tensor_to_array(t[0], self.m.folder, self.m.path)
                break
            if p.op_type not in ("Identity", "Cast", "Transpose") or not p.input:
                return None
            chain.append(p)
            name = p.input[0]
        else:
            return None
        for p in reversed(chain):
            if p.op_type == "Cast":
                v = v.astype(np.float32) if v.dtype.kind == "f" else v
            elif p.op_type == "Transpose":
                perm = [list(a.ints) for a in p.attribute if a.name == "perm"]
                v = v.transpose(perm[0]) if perm else v.T
        return v

    def attr(self, node: Any, name: str, default: Any) -> Any:
        import onnx

        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def ancestors(self, value: str, limit: int = 2000) -> set[str]:
        """Values `value` is computed from, nearest first (breadth-first, at most `limit`: the roles asked
        about sit a few nodes up), not through Shape / Size (a shape carries no values)."""
        seen, queue = {value}, deque([value])
        while queue and len(seen) < limit:
            p = self.producer.get(queue.popleft())
            if p is None or p.op_type in ("Shape", "Size"):
                continue
            for x in p.input:
                if x and x not in seen:
                    seen.add(x)
                    queue.append(x)
        return seen

    def reaches(self, value: str, op_types: set[str], depth: int = 4) -> bool:
        """Does `value` feed a node of one of op_types within `depth` hops?"""
        frontier = [value]
        for _ in range(depth):
            nxt = []
            for v in frontier:
                for c in self.consumers.get(v, []):
                    if c.op_type in op_types:
                        return True
                    nxt.extend(c.output)
            frontier = nxt
        return False


def _f32(x: Any) -> float:
    """A float32 attribute as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _events(g: _Graph) -> list[_Event]:
    ev: list[_Event] = []
    rms_mul_done: set[str] = set()
    for n in g.m.nodes:
        t = n.op_type
        if t == "Gather" and n.input:
            w = g.const(n.input[0])
            if w is not None and w.ndim == 2 and w.dtype.kind == "f":
                ev.append(_Event("E", n, weight=w))
        elif t == "Slice" and _leading_rows(g, n):  # table[:S]: learned positions read without a Gather
            ev.append(_Event("E", n, weight=g.const(n.input[0])))
        elif t == "LayerNormalization" and g.attr(n, "axis", -1) == -1:
            scale = g.const(n.input[1])
            bias = g.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if scale is None:
                continue
            ev.append(_Event("N", n, weight=scale, bias=bias, eps=_f32(g.attr(n, "epsilon", 1e-5))))
        elif t == "ReduceMean":
            e = _rms(g, n)
            if e is not None and e.node.name not in rms_mul_done:
                rms_mul_done.add(e.node.name)
                ev.append(e)
        elif t == "Softmax":
            ev.append(_Event("S", n))
        elif n.domain == MS or n.op_type == "SimplifiedLayerNormalization":
            e = _fused_event(g, n) if n.op_type != "SimplifiedLayerNormalization" else _simplified(g, n)
            if e is not None:
                ev.append(e)
        elif t in ("MatMul", "Gemm"):
            e = _linear(g, n)
            if e is not None:
                ev.append(e)
    for i, e in enumerate(ev):  # a fused skip norm's bias belongs to the linear just before it
        if e.lin_bias is not None:
            prev = next((p for p in reversed(ev[:i]) if p.kind == "L"), None)
            if prev is not None and prev.bias is None and prev.weight.shape[1] == e.lin_bias.size:
                prev.bias = e.lin_bias
    return ev


MS = "com.microsoft"


def _fused_event(g: _Graph, n: Any) -> _Event | None:
    """Events of onnxruntime's fused ops (optimum O2 files; the skip norms are N / R events whose residual
    add the data flow does not need, and whose optional bias input is the bias of the linear before them):
    M  EmbedLayerNormalization: word / position / segment tables and the norm (the node's constants)
    A  Attention: fused q|k|v (H, 3H) weight and bias, num_heads
    N  SkipLayerNormalization (x + skip + bias, then LayerNorm)
    R  SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (RMS norm, with the skip add)
    """
    c = [g.const(x) if x else None for x in n.input]
    eps = _f32(g.attr(n, "epsilon", 1e-12 if n.op_type != "SimplifiedLayerNormalization" else 1e-5))
    if n.op_type == "EmbedLayerNormalization" and len(c) >= 7 and all(v is not None for v in c[2:7]):
        return _Event("M", n, eps=eps)
    if n.op_type == "Attention" and len(c) > 2 and c[1] is not None and c[2] is not None:
        if g.attr(n, "unidirectional", 0) or g.attr(n, "qkv_hidden_sizes", None) or len(n.input) > 4:
            return None
        return _Event("A", n, weight=c[1], bias=c[2])
    if n.op_type == "SkipLayerNormalization" and len(c) >= 4 and c[2] is not None and c[3] is not None:
        return _Event("N", n, weight=c[2], bias=c[3], eps=eps, lin_bias=c[4] if len(c) > 4 else None)
    if n.op_type == "SkipSimplifiedLayerNormalization" and len(c) >= 3 and c[2] is not None:
        return _Event("R", n, weight=c[2], eps=eps, lin_bias=c[3] if len(c) > 3 else None)
    return None


def _simplified(g: _Graph, n: Any) -> _Event | None:
    """onnxruntime's SimplifiedLayerNormalization (an RMS norm, in the ai.onnx domain as a contrib op)."""
    w = g.const(n.input[1]) if len(n.input) > 1 else None
    return None if w is None else _Event("R", n, weight=w, eps=_f32(g.attr(n, "epsilon", 1e-5)))


def _leading_rows(g: _Graph, n: Any) -> bool:
    """Slice(table, [0], S, [0]) of a 2-D float constant: the first S rows of a position table."""
    if len(n.input) < 4 or g.const(n.input[0]) is None:
        return False
    w, starts, axes = g.const(n.input[0]), g.const(n.input[1]), g.const(n.input[3])
    return (
        w.ndim == 2 and w.dtype.kind == "f" and starts is not None and axes is not None
        and starts.reshape(-1).tolist() == [0] and axes.reshape(-1).tolist() == [0]
    )  # fmt: skip


def _rms(g: _Graph, mean: Any) -> _Event | None:
    """x * rsqrt(mean(x^2) + eps) * w starting at ReduceMean(x^2): the scale Mul and eps, or None."""
    p = g.producer.get(mean.input[0])
    if p is None or not (
        (
            p.op_type == "Pow"
            and (e := g.const(p.input[1])) is not None
            and float(np.asarray(e).reshape(-1)[0]) == 2.0
        )
        or (p.op_type == "Mul" and p.input[0] == p.input[1])
    ):
        return None
    eps, frontier = None, list(mean.output)
    for _ in range(6):
        nxt = []
        for v in frontier:
            for c in g.consumers.get(v, []):
                if c.op_type == "Add" and eps is None:
                    for x in c.input:
                        k = g.const(x)
                        if k is not None and k.size == 1:
                            eps = _f32(np.asarray(k).reshape(-1)[0])
                if c.op_type == "Mul":
                    for x in c.input:
                        w = g.const(x)
                        if w is not None and w.ndim == 1 and w.size > 1:
                            return _Event("R", c, weight=w, eps=eps if eps is not None else 1e-6)
                nxt.extend(c.output)
        frontier = nxt
    return None


def _linear(g: _Graph, n: Any) -> _Event | None:
    e = _linear_event(g, n)
    if e is not None and e.quant is not None:
        q, s, hint = e.quant
        e.quant = quantized_from(q.T, s.T, hint) if g.attr(n, "transB", 0) else quantized_from(q, s, hint)
    return e


def _linear_event(g: _Graph, n: Any) -> _Event | None:
    if len(n.input) < 2:
        return None
    dq = fold_dq(g, n.input[1])  # a DequantizeLinear(int8 initializer) weight: its float value and source
    w = g.const(n.input[1]) if dq is None else dq[0]
    src = None if dq is None else dq[1:]  # (int8, scales) in the node's orientation; _linear converts
    if w is None or w.ndim != 2 or w.dtype.kind != "f" or w.shape[0] < 2 or g.const(n.input[0]) is not None:
        return None  # (an in-dim of 1 is an outer product, e.g. positions x inv_freq, not a layer)
    bias, out = None, n.output[0]
    if n.op_type == "Gemm":
        if g.attr(n, "transA", 0) or g.attr(n, "alpha", 1.0) != 1.0 or g.attr(n, "beta", 1.0) != 1.0:
            return None
        if g.attr(n, "transB", 0):
            w = w.T
        if len(n.input) > 2 and n.input[2]:
            bias = g.const(n.input[2])
    users = g.consumers.get(out, [])
    if (
        bias is None
        and len(users) == 1
        and users[0].op_type in ("BiasGelu", "FastGelu")
        and len(users[0].input) > 1
    ):
        b = g.const(users[0].input[1])
        if b is not None and b.ndim == 1 and b.size == w.shape[1]:
            return _Event("L", n, weight=w, bias=b, out=out, quant=src)  # the gelu adds it: out stays
    if bias is None and len(users) == 1 and users[0].op_type == "Add":
        other = [x for x in users[0].input if x != out]
        b = g.const(other[0]) if other else None
        if b is not None and b.ndim == 1 and b.size == w.shape[1]:
            bias, out = b, users[0].output[0]
    return _Event("L", n, weight=w, bias=bias, out=out, quant=src)


def _scores(g: _Graph, softmax: Any) -> Any:
    """The MatMul computing the attention scores that `softmax` normalises (nearest non-constant one)."""
    stack, seen = [softmax.input[0]], set()
    while stack:
        v = stack.pop(0)
        if v in seen:
            continue
        seen.add(v)
        p = g.producer.get(v)
        if p is None:
            continue
        if p.op_type == "MatMul" and g.const(p.input[1]) is None and g.const(p.input[0]) is None:
            return p
        stack.extend(x for x in p.input if x)
    return None


def _qkv_roles(g: _Graph, lins: list[_Event], softmax: Any) -> tuple[_Event, _Event, _Event]:
    sc = _scores(g, softmax)
    if sc is None:
        raise NotRecognised(f"no scores MatMul before Softmax {softmax.name!r}")
    left, right = g.ancestors(sc.input[0]), g.ancestors(sc.input[1])
    q = [e for e in lins if e.out in left and e.out not in right]
    k = [e for e in lins if e.out in right and e.out not in left]
    v = [e for e in lins if e.out not in left and e.out not in right]
    if len(q) != 1 or len(k) != 1 or len(v) != 1:
        raise NotRecognised(f"cannot tell q, k, v apart around Softmax {softmax.name!r}")
    return q[0], k[0], v[0]


def _tanh_gelu(g: _Graph, value: str) -> bool:
    """Is the GELU applied to `value` the tanh approximation (Tanh in the formula, FastGelu, or Gelu with
    approximate="tanh")? Otherwise it is the erf form."""
    frontier = [value]
    for _ in range(6):
        nxt = []
        for v in frontier:
            for c in g.consumers.get(v, []):
                if c.op_type in ("Tanh", "FastGelu"):
                    return True
                if c.op_type == "Gelu" and g.attr(c, "approximate", b"none") in ("tanh", b"tanh"):
                    return True
                nxt.extend(c.output)
        frontier = nxt
    return False


def _index_source(g: _Graph, gather: Any) -> set[str]:
    return g.ancestors(gather.input[1]) & set(g.m.inputs)


def _need(cond: bool, why: str) -> None:
    if not cond:
        raise NotRecognised(why)


def _gpt2(g: _Graph, emb: list[_Event], ev: list[_Event], layers: int) -> Match:
    _need(len(emb) == 2, f"GPT-2 has 2 embeddings, found {len(emb)}")
    wte = [e for e in emb if "input_ids" in _index_source(g, e.node)] or [
        max(emb, key=lambda e: e.weight.shape[0])
    ]
    wpe = [e for e in emb if e is not wte[0]]
    w: dict[str, np.ndarray] = {"wte.weight": wte[0].weight, "wpe.weight": wpe[0].weight}
    it = iter(ev)
    tanh = False
    for i in range(layers):
        ln1, attn, sm, proj, ln2, fc, mproj = (next(it) for _ in range(7))
        p = f"h.{i}."
        for name, e in (("ln_1", ln1), ("ln_2", ln2)):
            _need(e.bias is not None, f"GPT-2 {name} has no bias")
            w[p + name + ".weight"], w[p + name + ".bias"] = e.weight, e.bias
        for name, e in (
            ("attn.c_attn", attn),
            ("attn.c_proj", proj),
            ("mlp.c_fc", fc),
            ("mlp.c_proj", mproj),
        ):
            _need(e.bias is not None, f"GPT-2 {name} has no bias")
            w[p + name + ".weight"], w[p + name + ".bias"] = e.weight, e.bias
        tanh = _tanh_gelu(g, fc.out)
    lnf, head = next(it), next(it)
    _need(lnf.bias is not None, "GPT-2 ln_f has no bias")
    w["ln_f.weight"], w["ln_f.bias"] = lnf.weight, lnf.bias
    _need(head.bias is None and head.weight.shape == w["wte.weight"].T.shape, "GPT-2 head shape")
    # an int8 head (QDQ) is the native model's TiedEmbedding: an int8 copy of the table, whatever its values
    tied = head.quant is not None or np.array_equal(head.weight, w["wte.weight"].T)
    _need(tied, "the GPT-2 lm head is not tied to the embedding")
    h, inner = w["wte.weight"].shape[1], w["h.0.mlp.c_fc.weight"].shape[1]
    cfg = dict(
        vocab_size=w["wte.weight"].shape[0], n_positions=w["wpe.weight"].shape[0], n_embd=h, n_layer=layers,
        n_inner=None if inner == 4 * h else inner, layer_norm_epsilon=ln1.eps,
        activation_function="gelu_new" if tanh else "gelu",
    )  # fmt: skip
    match = Match("gpt2", cfg, w)
    if head.quant is not None:
        match.quant["lm_head.weight"], match.float_head = head.quant, head.weight
    return match


def _llama(g: _Graph, emb: list[_Event], ev: list[_Event], layers: int) -> Match:
    _need(len(emb) == 1, f"Llama has 1 embedding, found {len(emb)}")
    w: dict[str, np.ndarray] = {"embed_tokens.weight": emb[0].weight}
    it = iter(ev)
    bias_attn = bias_mlp = False
    for i in range(layers):
        n1, l1, l2, l3, sm, o, n2, m1, m2, m3 = (next(it) for _ in range(10))
        p = f"layers.{i}."
        q, k, v = _qkv_roles(g, [l1, l2, l3], sm.node)
        gate = [e for e in (m1, m2) if g.reaches(e.out, {"Sigmoid"}, depth=2)]
        _need(len(gate) == 1, "cannot tell the SwiGLU gate from up")
        up = m2 if gate[0] is m1 else m1
        w[p + "input_layernorm.weight"] = n1.weight
        w[p + "post_attention_layernorm.weight"] = n2.weight
        for name, e in (("self_attn.q_proj", q), ("self_attn.k_proj", k), ("self_attn.v_proj", v),
                        ("self_attn.o_proj", o), ("mlp.gate_proj", gate[0]), ("mlp.up_proj", up),
                        ("mlp.down_proj", m3)):  # fmt: skip
            w[p + name + ".weight"] = e.weight.T  # HF nn.Linear layout (out, in)
            if e.bias is not None:
                w[p + name + ".bias"] = e.bias
        bias_attn |= q.bias is not None
        bias_mlp |= m3.bias is not None
    nf, head = next(it), next(it)
    w["norm.weight"] = nf.weight
    tied = np.array_equal(head.weight, w["embed_tokens.weight"].T)
    if not tied:
        w["lm_head.weight"] = head.weight.T
    qd, kd = w["layers.0.self_attn.q_proj.weight"].shape[0], w["layers.0.self_attn.k_proj.weight"].shape[0]
    inv = _rope_constants(g)
    cfg = dict(
        vocab_size=w["embed_tokens.weight"].shape[0], hidden_size=w["embed_tokens.weight"].shape[1],
        intermediate_size=w["layers.0.mlp.gate_proj.weight"].shape[0], num_hidden_layers=layers,
        rms_norm_eps=n1.eps, tie_word_embeddings=bool(tied), attention_bias=bias_attn, mlp_bias=bias_mlp,
        max_position_embeddings=LLAMA_MAX_POSITIONS, _qd=qd, _kd=kd,
        _inv_freq=inv,
    )  # fmt: skip
    return Match("llama", cfg, w)


def _rope_constants(g: _Graph) -> list[np.ndarray]:
    """1-D float constants the Cos nodes are computed from (the RoPE inv_freq, found by data flow)."""
    out: dict[str, np.ndarray] = {}
    for n in g.m.nodes:
        if n.op_type == "Cos":
            for v in g.ancestors(n.input[0]):
                c = g.m.initializers.get(v)
                if c is not None and c.ndim == 1 and c.dtype.kind == "f" and c.size > 1:
                    out[v] = c
    return list(out.values())


def _bert(g: _Graph, emb: list[_Event], ev: list[_Event], layers: int) -> Match:
    _need(len(emb) == 3, f"BERT has 3 embeddings, found {len(emb)}")
    src = {id(e): _index_source(g, e.node) for e in emb}
    word = [e for e in emb if "input_ids" in src[id(e)]]
    types = [e for e in emb if "token_type_ids" in src[id(e)]]
    pos = [e for e in emb if e not in word and e not in types]
    _need(len(word) == 1 and len(types) == 1 and len(pos) == 1, "cannot tell BERT's embeddings apart")
    e_ = "embeddings."
    w: dict[str, np.ndarray] = {
        e_ + "word_embeddings.weight": word[0].weight, e_ + "position_embeddings.weight": pos[0].weight,
        e_ + "token_type_embeddings.weight": types[0].weight,
    }  # fmt: skip
    it = iter(ev)
    ln = next(it)
    w[e_ + "LayerNorm.weight"], w[e_ + "LayerNorm.bias"] = ln.weight, ln.bias
    tanh = False
    for i in range(layers):
        l1, l2, l3, sm, o, n1, fc, out, n2 = (next(it) for _ in range(9))
        q, k, v = _qkv_roles(g, [l1, l2, l3], sm.node)
        p = f"encoder.layer.{i}."
        roles = (
            ("attention.self.query", q), ("attention.self.key", k), ("attention.self.value", v),
            ("attention.output.dense", o), ("intermediate.dense", fc), ("output.dense", out),
        )  # fmt: skip
        for name, e in roles:
            _need(e.bias is not None, f"BERT {name} has no bias")
            w[p + name + ".weight"], w[p + name + ".bias"] = e.weight.T, e.bias
        for name, e in (("attention.output.LayerNorm", n1), ("output.LayerNorm", n2)):
            _need(e.bias is not None, f"BERT {name} has no bias")
            w[p + name + ".weight"], w[p + name + ".bias"] = e.weight, e.bias
        tanh = _tanh_gelu(g, fc.out)
    wd = w[e_ + "word_embeddings.weight"]
    cfg = dict(
        vocab_size=wd.shape[0], hidden_size=wd.shape[1], num_hidden_layers=layers,
        intermediate_size=w["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=pos[0].weight.shape[0], type_vocab_size=types[0].weight.shape[0],
        layer_norm_eps=ln.eps, hidden_act="gelu_new" if tanh else "gelu",
    )  # fmt: skip
    return Match("bert", cfg, w)


def _bert_fused(g: _Graph, emb: list[_Event], ev: list[_Event], layers: int) -> Match:
    """BERT after onnxruntime's transformer optimizer: M (A L N L L N){n}."""
    it = iter(ev)
    m = next(it)
    word, pos, seg, gamma, beta = (g.const(x) for x in m.node.input[2:7])
    e_ = "embeddings."
    w: dict[str, np.ndarray] = {
        e_ + "word_embeddings.weight": word, e_ + "position_embeddings.weight": pos,
        e_ + "token_type_embeddings.weight": seg, e_ + "LayerNorm.weight": gamma, e_ + "LayerNorm.bias": beta,
    }  # fmt: skip
    heads, tanh = set(), False
    for i in range(layers):
        a, o, n1, fc, out, n2 = (next(it) for _ in range(6))
        p = f"encoder.layer.{i}."
        h = a.weight.shape[0]
        _need(a.weight.shape[1] == 3 * h, "fused Attention weight is not (H, 3H)")
        heads.add(int(g.attr(a.node, "num_heads", 0)))
        for j, name in enumerate(("query", "key", "value")):
            w[p + f"attention.self.{name}.weight"] = a.weight[:, j * h : (j + 1) * h].T
            w[p + f"attention.self.{name}.bias"] = a.bias[j * h : (j + 1) * h]
        for name, lin in (("attention.output.dense", o), ("intermediate.dense", fc), ("output.dense", out)):
            _need(lin.bias is not None, f"BERT {name} has no bias")
            w[p + name + ".weight"], w[p + name + ".bias"] = lin.weight.T, lin.bias
        for name, e in (("attention.output.LayerNorm", n1), ("output.LayerNorm", n2)):
            _need(e.bias is not None, f"BERT {name} has no bias")
            w[p + name + ".weight"], w[p + name + ".bias"] = e.weight, e.bias
        tanh = _tanh_gelu(g, fc.out)
    _need(len(heads) == 1 and 0 not in heads, "Attention nodes disagree on num_heads")
    cfg = dict(
        vocab_size=word.shape[0], hidden_size=word.shape[1], num_hidden_layers=layers,
        intermediate_size=w["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=pos.shape[0], type_vocab_size=seg.shape[0], layer_norm_eps=m.eps,
        hidden_act="gelu_new" if tanh else "gelu",
    )  # fmt: skip
    match = Match("bert", cfg, w)
    match.heads = heads.pop()
    return match


_FAMILIES = {
    "gpt2": (re.compile(r"(NLSLNLL)+NL"), 7, _gpt2),
    "llama": (re.compile(r"(RLLLSLRLLL)+RL"), 10, _llama),
    "bert": (re.compile(r"N(LLLSLNLLN)+"), 9, _bert),
    "bert_fused": (re.compile(r"M(ALNLLN)+"), 6, _bert_fused),
}


def match_structure(m: OnnxModel) -> Match:
    """The family and HF-named weights of a graph by its structure (see the module docstring); the head
    count is not known yet. Raises NotRecognised with the reason."""
    g = _Graph(m)
    ev = _events(g)
    emb = [e for e in ev if e.kind == "E"]
    rest = [e for e in ev if e.kind != "E"]
    code = "".join(e.kind for e in rest)
    for family, (pattern, per_layer, build) in _FAMILIES.items():
        if pattern.fullmatch(code):
            layers = (len(code) - (1 if family.startswith("bert") else 2)) // per_layer
            match = build(g, emb, rest, layers)
            match.softmax_inputs = [e.node.input[0] for e in rest if e.kind == "S"]
            _quantized_names(match, rest)
            return match
    shown = code if len(code) <= 60 else code[:60] + "..."
    raise NotRecognised(
        f"{m.path}: the graph's structure ({len(emb)} embeddings, then {shown!r} in N=LayerNorm R=RMSNorm "
        "L=linear S=softmax M/A=fused embedding/attention) is not GPT-2, Llama or BERT"
    )


def _quantized_names(match: Match, events: list[_Event]) -> None:
    """match.quant for every HF weight that is a quantized linear's weight (the same array, or its .T)."""
    by_data = {e.weight.__array_interface__["data"][0]: e for e in events if e.kind == "L" and e.quant}
    for name, a in match.weights.items():
        e = by_data.get(a.__array_interface__["data"][0]) if isinstance(a, np.ndarray) else None
        if e is not None and a.shape in (e.weight.shape, e.weight.shape[::-1]) and name not in match.quant:
            match.quant[name] = e.quant


def _probe_feeds(m: OnnxModel, family: str) -> dict[str, np.ndarray]:
    """Probe inputs: 5 token ids (0 / 1: in every vocabulary), the usual masks, an empty KV cache."""
    ids = np.random.default_rng(0).integers(0, 2, size=(1, PROBE_TOKENS), dtype=np.int64)
    try:
        return default_feeds(m.inputs, ids, {})
    except ValueError as e:
        raise NotRecognised(f"{m.path}: {e} (not an input a {family} model takes)") from None


def _config(match: Match, heads: int) -> Any:
    c = dict(match.config)
    if match.family == "gpt2":
        return GPT2Config(n_head=heads, **c)
    if match.family == "bert":
        return BertConfig(num_attention_heads=heads, **c)
    qd, kd, invs = c.pop("_qd"), c.pop("_kd"), c.pop("_inv_freq")
    d = qd // heads
    theta = 10000.0
    inv = next((a for a in invs if a.size == d // 2), None)
    if inv is not None and inv.size > 1 and float(inv[1]) > 0:
        # inv[p] = theta ** (-2p / d); entry 1 is a high frequency, which rope scaling (llama3) leaves alone
        theta = float(inv[1]) ** (-d / 2.0)
        if abs(theta - round(theta)) <= 1e-4 * theta:  # float32 inv_freq: snap 9999.99 back to 10000
            theta = float(round(theta))
    config = LlamaConfig(
        num_attention_heads=heads, num_key_value_heads=kd // d, head_dim=d, rope_theta=theta, **c
    )
    if inv is not None and not np.allclose(llama_inv_freq(config), inv, rtol=1e-6, atol=0):
        # scaled frequencies (llama3, linear, ...): the native model runs the graph's own table
        match.inv_freq = np.asarray(inv, dtype=np.float32)
    return config


def build_native(config: Any, match: Match, weights: dict[str, Any], xp: Any, quantized: bool = True) -> Any:
    """The native model of a recognised graph from `weights` (match.weights converted to the run dtype and
    device), with the graph's RoPE frequency table when it is not the plain theta one, and the int8 matrices
    of a QDQ file in place of their float values (models.quantize's layout, the file's int8 values).
    quantized=False keeps the graph's dequantized float values instead (the probe: they are exactly what
    the graph computes with, also where it rounds them to float16)."""
    model = build_model(config, weights, xp)
    if match.inv_freq is not None:
        model.inv_freq = xp.asarray(match.inv_freq)  # float32 (head_dim / 2,), what LlamaModel keeps
    if match.quant and quantized:
        attach_quantized(model, match.quant, xp)
    elif match.float_head is not None:  # GPT-2's head is not the table: an untied float copy for the probe
        from rawformer.models.quantize import TiedEmbedding

        model.wte = TiedEmbedding(model.wte, xp.asarray(match.float_head, dtype=model.dtype))
    return model


def native_logits(model: Any, ids: np.ndarray) -> Any:
    """Logits (B, S, V) of equal-length token rows through a decoder's paged forward (a fresh pool)."""
    from rawformer.runtime.generate import make_pool

    b, s = ids.shape
    pool = make_pool(model, b * s + 16, max_seq_len=s)
    seqs = list(range(b))
    for i in seqs:
        pool.add_sequence(i, ids[i].tolist())
    try:
        out = model.forward(pool.prepare(seqs), pool.arena, last_only=False)  # (B S, V)
    finally:
        for i in seqs:
            pool.free_sequence(i)
    return out.reshape(b, s, -1)


def recognise(m: OnnxModel, *, verify: bool = True) -> tuple[Any, Match]:
    """Match the structure, find the head count and check the native model against the executor.

    Returns (config, match): match.weights are NumPy arrays (HF names and layouts; views of the file's
    tensors where possible, in the file's dtype).
    Raises NotRecognised with the reason."""
    match = match_structure(m)
    feeds = _probe_feeds(m, match.family)
    params = sum(int(a.size) for a in m.initializers.values() if a.dtype.kind == "f")
    probe = np.dtype(np.float64 if params <= PROBE_F64_MAX_PARAMS else np.float32)
    ex = OnnxExecutor(m, device="cpu", dtype=probe if verify else np.float32)
    outs, kept = _run_keeping(ex, feeds, match.softmax_inputs)
    heads = {int(kept[n].shape[1]) for n in match.softmax_inputs if kept[n].ndim == 4}
    if match.heads is not None:
        heads = {match.heads}
    if len(heads) != 1:
        raise NotRecognised(f"{m.path}: attention scores are not (batch, heads, q, k) with one head count")
    try:
        config = _config(match, heads.pop())
    except (ValueError, TypeError, KeyError) as e:
        raise NotRecognised(
            f"{m.path}: looks like {match.family} but its sizes do not make a config: {e}"
        ) from None
    if (
        verify
    ):  # in float64 where it fits, so that a wrong mapping (even a GELU variant) cannot hide in rounding
        try:
            model = build_native(
                config,
                match,
                {k: np.asarray(v, probe) for k, v in match.weights.items()},
                np,
                quantized=False,
            )
        except (KeyError, ValueError) as e:
            raise NotRecognised(f"{m.path}: the weights do not fit {type(config).__name__}: {e}") from None
        ref = np.asarray(next(iter(outs.values())), dtype=np.float64)
        if match.family == "bert":
            got = model.forward(feeds["input_ids"], feeds.get("attention_mask"), feeds.get("token_type_ids"))
        else:
            got = native_logits(model, feeds["input_ids"])
        got = np.asarray(got, dtype=np.float64)
        if got.shape != ref.shape:
            raise NotRecognised(f"{m.path}: the graph outputs {ref.shape}, the native model {got.shape}")
        err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
        rtol = VERIFY_RTOL[probe]
        if any(a.dtype == np.float16 for a in m.initializers.values()):
            # an fp16 file's graph constants (GELU's 0.044715, sqrt(2/pi), eps) are fp16-rounded too, which
            # the native model's exact constants do not share: 2.05e-05 measured on GPT-2 small (H100 run);
            # a wrong GELU form still shows at ~2.4e-04
            rtol = max(rtol, FP16_FILE_RTOL)
        qdq = [match.weights[k] for k in match.quant if k in match.weights] + [match.float_head]
        if any(a is not None and a.dtype == np.float16 for a in qdq):
            rtol = max(rtol, VERIFY_RTOL_QDQ_F16)
        if not err <= rtol:
            raise NotRecognised(
                f"{m.path}: looks like {match.family} but the native model differs from the graph on a "
                f"{probe} probe (max relative error {err:.2e}): a variant the native model does not have "
                "(untied or scaled head, another norm placement, ...)"
            )
        match.probe_error = err
    return config, match


def _run_keeping(
    ex: OnnxExecutor, feeds: dict[str, Any], keep: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the executor and also return the values named in `keep` (its intermediate values)."""
    saved = ex.output_names
    ex.output_names = list(dict.fromkeys([*saved, *keep]))
    dropped = []
    for n in ex.nodes:  # keep the values alive to the end of the run
        kept = [x for x in n.drop_after if x in keep]
        for x in kept:
            n.drop_after.remove(x)
            dropped.append((n, x))
    try:
        res = ex.run(feeds)
    finally:
        ex.output_names = saved
        for n, x in dropped:
            n.drop_after.append(x)
    return {k: res[k] for k in saved}, {k: res[k] for k in keep}
