"""rawformer.runtime: generation over the paged KV cache, sampling, CUDA-graph decode steps, embeddings.

from rawformer.runtime import Generator, generate, embed
out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32)            # greedy, token ids
gen = Generator(model, pool, tokenizer)                                  # reuse the pool and graphs
out = gen.generate(["Hello"], 64, temperature=0.8, top_p=0.95, seed=0, stop=["\\n"])
vectors = embed(bert_model, tokenizer, ["a sentence", "another one"])
"""

from rawformer.runtime.adaptive import AdaptiveBatcher
from rawformer.runtime.cuda_graphs import (
    DEFAULT_BUCKETS,
    CupyCapture,
    DecodeGraphs,
    GraphCaptureError,
    GraphStats,
    bucket_for,
)
from rawformer.runtime.engine import Engine, EngineClosed, QueueFull
from rawformer.runtime.generate import (
    Generation,
    GenerationResult,
    Generator,
    embed,
    encode_prompts,
    generate,
    make_pool,
)
from rawformer.runtime.sampler import (
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    sample_tokens,
    sampling_probs,
)
from rawformer.runtime.scheduler import Request, RequestOutput, Scheduler

__all__ = [
    "AdaptiveBatcher",
    "Engine",
    "EngineClosed",
    "QueueFull",
    "Request",
    "RequestOutput",
    "Scheduler",
    "DEFAULT_BUCKETS",
    "CupyCapture",
    "DecodeGraphs",
    "Generation",
    "GenerationResult",
    "Generator",
    "GraphCaptureError",
    "GraphStats",
    "Sampler",
    "SamplingParams",
    "apply_repetition_penalty",
    "bucket_for",
    "embed",
    "encode_prompts",
    "generate",
    "make_pool",
    "sample_tokens",
    "sampling_probs",
]
