"""The subcommands of `rawformer`: one module each, with `register(subparsers)` and `run(args) -> int`.

`rawformer.cli` imports the modules of COMMANDS that exist (train, eval and export come from other parts of
the project and are listed only when their module is installed).
"""

COMMANDS = ("info", "generate", "serve", "bench", "plan", "train", "eval", "export", "demo")
