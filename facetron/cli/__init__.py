"""The ``facetron`` command line: the one layer that may import every part
(core, training, export, client, benchmarks). One module per subcommand
group; :mod:`facetron.cli.main` wires them together."""

from facetron.cli.main import EXIT_ERROR, build_parser, main

__all__ = ["EXIT_ERROR", "build_parser", "main"]
