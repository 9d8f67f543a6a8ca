"""The subcommands of `rawformer`: one module each, with `register(subparsers)` and `run(args) -> int`.

`rawformer.cli` registers the modules of COMMANDS in this order.
"""

COMMANDS = ("info", "generate", "serve", "bench", "plan", "train", "eval", "export", "demo")
