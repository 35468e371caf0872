"""Subcommands of the ``w2s-theory`` CLI; each module has ``register(subparsers)``."""
