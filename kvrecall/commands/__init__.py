"""One module per ``kvrecall`` subcommand; each exposes ``register(subparsers)``."""
