"""Subcommands of the ``facetron`` CLI (one module each)."""
