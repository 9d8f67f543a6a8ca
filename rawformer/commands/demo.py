"""`rawformer demo`: a model answering prompts through continuous batching (default), or the ops check."""

from __future__ import annotations

import argparse

import numpy as np

from rawformer.commands._model import add_model_args, bundled_model

EPILOG = """examples:
  rawformer demo                          the bundled model (the package's models/ folder), streamed
  rawformer demo --model ckpt/            another checkpoint or .onnx file
  rawformer demo --random gpt2-tiny-bytes random weights (noise text; shows the machinery)
  rawformer demo --ops --rows 512         every fused op vs its float64 reference, on each backend

Without a bundled model and without --model, the demo runs the random tiny byte-level GPT-2 and says so."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="stream a few prompts through continuous batching (or --ops: check every fused op)",
        description="Loads the bundled model, runs a handful of prompts through continuous batching with the "
        "text streamed as it is generated, then prints tokens/s, the KV memory used against a contiguous "
        "cache, and the ops / kernels that ran. --ops instead runs every fused op on each backend present "
        "and compares it with its float64 NumPy reference.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_model_args(p)
    m = p.add_argument_group("model demo")
    m.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; default: five)")
    m.add_argument("--max-tokens", type=int, default=48, help="new tokens per prompt (default 48)")
    m.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    o = p.add_argument_group("ops check (--ops; --rows / --cols / --op-dtype imply it)")
    o.add_argument("--ops", action="store_true", help="run the ops check instead of the model demo")
    o.add_argument("--rows", type=int, default=None, help="rows of the test matrix (default 512)")
    o.add_argument("--cols", type=int, default=None, help="row length (default 1000: not a power of two)")
    o.add_argument("--op-dtype", default="float32", choices=["float16", "float32"], help="ops input dtype")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rawformer import demo

    if args.ops or args.rows is not None or args.cols is not None:
        demo.run(rows=args.rows or 512, cols=args.cols or 1000, dtype=np.dtype(args.op_dtype))
        return 0
    from rawformer.commands._model import load_model

    if not args.model and not args.random and bundled_model() is None:
        print(
            "(no bundled model in this install: running a random-weight tiny byte-level GPT-2, whose text "
            "is noise; pass --model PATH for a trained one)\n"
        )
        args.random = "gpt2-tiny-bytes"
    model, tok, name = load_model(args)
    if tok is None:
        raise ValueError(
            "the demo needs a tokenizer (tokenizer.json beside the model, or a byte-level model)"
        )
    prompts = args.prompt or list(demo.PROMPTS)
    demo.run_model(model, tok, prompts, args.max_tokens, temperature=args.temperature, name=name)
    return 0
