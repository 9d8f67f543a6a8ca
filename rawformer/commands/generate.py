"""`rawformer generate`: complete prompts with a model, optionally streaming the text as it comes."""

from __future__ import annotations

import argparse
import sys

from rawformer.commands._model import add_model_args, engine_args, load_model, make_engine

EPILOG = """examples:
  rawformer generate "Once upon a time" --max-tokens 64 --stream
  rawformer generate "a" "b" "c" --temperature 0.8 --top-p 0.95 --seed 1 --stop "\\n"
  rawformer generate --model ckpt/ "Hello" --repetition-penalty 1.2
  rawformer generate --random gpt2-tiny-bytes "noise in, noise out" --stream

All prompts run together through continuous batching (the same engine `rawformer serve` uses). Temperature 0
(the default) is greedy decoding: the same text every run."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="complete prompts (sampling flags, --stream)", epilog=EPILOG,
        description="Generates a continuation of every prompt and prints it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text (several run as one batch)")
    add_model_args(p)
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set with this mass (1 = all)")
    s.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    s.add_argument("--sample-seed", type=int, default=None, help="seed of prompt i's sampling: this + i")
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    s.add_argument("--stream", action="store_true", help="print text as it is generated")
    engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    model, tok, name = load_model(args)
    if tok is None:
        raise ValueError("this model has no tokenizer (tokenizer.json): text prompts cannot be encoded")
    engine = make_engine(args, model, tok, name)
    many = len(args.prompts) > 1

    def show(o) -> None:
        if args.stream and o.new_text:
            sys.stdout.write(f"[{ids.index(o.request_id)}] {o.new_text}\n" if many else o.new_text)
            sys.stdout.flush()

    ids: list = []
    for i, prompt in enumerate(args.prompts):
        seed = None if args.sample_seed is None else args.sample_seed + i
        ids.append(engine.add_request(
            prompt, args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, seed=seed, stop=args.stop, ignore_eos=args.ignore_eos,
            on_output=show,
        ))  # fmt: skip
    finals = {o.request_id: o for o in engine.iterate() if o.finished}
    if args.stream and not many:
        print()
    for i, rid in enumerate(ids):
        o = finals[rid]
        if not args.stream:
            print(f"[{i}] {args.prompts[i]}{o.text}" if many else f"{args.prompts[i]}{o.text}")
        print(f"  ({len(o.token_ids)} tokens, {o.finish_reason})", file=sys.stderr)
    return 0
