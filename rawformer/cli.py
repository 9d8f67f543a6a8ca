"""The `rawformer` command: a dispatcher over rawformer/commands/<name>.py.

Each command module has `register(subparsers)` (its parser, with set_defaults(func=run)) and
`run(args) -> int`; a command's heavy imports happen in its `run`, so `rawformer -h` stays fast.

    rawformer info | generate | serve | bench | plan | train | eval | export | demo   (-h on each)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from rawformer.commands import COMMANDS
from rawformer.commands.info import info

__all__ = ["build_parser", "info", "main"]

EPILOG = """start here:
  rawformer demo                 a model streaming text through continuous batching
  rawformer info                 what rawformer found on this machine
  rawformer generate "Hello" --stream
  rawformer serve --port 8000    OpenAI-compatible server (127.0.0.1)
  rawformer plan --preset llama-1b --memory 80

`rawformer COMMAND -h` explains each command with examples."""


def available() -> list[str]:
    """The commands, in COMMANDS order."""
    return list(COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rawformer",
        description="A transformer runtime on hand-written CUDA kernels, with a NumPy path for every op.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in available():
        importlib.import_module(f"rawformer.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError, TypeError, OSError, ImportError) as exc:
        print(f"rawformer {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
