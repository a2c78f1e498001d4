"""What every ``facetron`` command follows, applied in one place by
:func:`facetron.cli.main.build_parser`:

* every option has help text, and its default is shown (:class:`HelpFormatter`:
  paths relative to the data root, ``$FACETRON_HOME/...``, never absolute
  into the checkout); :func:`options_without_help` finds the ones that lack it;
* the global options ``-q`` / ``-v`` / ``--progress`` are accepted before the
  command and after it (:func:`add_global_options`);
* ``facetron --version`` prints the installed distribution's version.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterator

from facetron import __version__, progress
from facetron.contract import PARENT_PID_ENV
from facetron.paths import shown

PR_SET_PDEATHSIG = 1  # linux/prctl.h

DISTRIBUTION = "facetron"
#: the log level switches of the libraries facetron loads models with, set to "error" by -q
QUIET_LIBRARY_ENV = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")


def installed_version() -> str:
    """The installed distribution's version, else the package's own ``__version__`` (a bare checkout)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return __version__


def shown_default(value: object) -> str:
    """A default as help texts show it."""
    if isinstance(value, Path):
        return shown(value)
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default (unless its help already says it, or there is none to show) with paths
    relative to the data root; ``%(default)s`` in a help text is shown the same way."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or not action.option_strings:
            return text
        if action.default in (None, False, argparse.SUPPRESS) or action.default == []:
            return text
        if isinstance(action, argparse._CountAction):
            return text
        return text + " (default: %(default)s)"

    def _expand_help(self, action: argparse.Action) -> str:
        params = dict(vars(action), prog=self._prog)
        for name in list(params):
            if params[name] is argparse.SUPPRESS:
                del params[name]
            elif hasattr(params[name], "__name__"):
                params[name] = params[name].__name__
        if "default" in params:
            params["default"] = shown_default(params["default"]).replace("%", "%%")
        if params.get("choices") is not None:
            params["choices"] = ", ".join(map(str, params["choices"]))
        return self._get_help_string(action) % params


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("facetron",)
         ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """``(command path, parser)`` for the parser and every nested subcommand's parser."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, path + (name,))


def is_leaf(parser: argparse.ArgumentParser) -> bool:
    """A parser that runs a command (no nested subcommands)."""
    return not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def options_without_help(parser: argparse.ArgumentParser) -> list[str]:
    """``"facetron cmd sub --option"`` for every argument of every (sub)command that has no help text."""
    missing = []
    for path, p in walk(parser):
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(" ".join(path + ("/".join(action.option_strings) or action.dest,)))
    return missing


def add_global_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """``-q`` / ``-v`` / ``--progress``: on the top-level parser with their defaults, on each command's parser
    with none (so ``facetron -q demo`` and ``facetron demo -q`` mean the same and neither overrides the other)."""
    group = parser.add_argument_group("output" if top else "output (also accepted before the command)")
    loud = group.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", default=False if top else argparse.SUPPRESS,
                      help="only errors: log level ERROR and no progress output")
    loud.add_argument("-v", "--verbose", action="count", default=0 if top else argparse.SUPPRESS,
                      help="more log output: -v INFO, -vv DEBUG (default: WARNING)")
    group.add_argument("--progress", choices=progress.PROGRESS_MODES,
                       default=progress.DEFAULT_PROGRESS if top else argparse.SUPPRESS,
                       help="progress output on stderr: bars (tqdm), lines (one line per stage when it ends), off, "
                            "or auto = bars on a terminal, else lines (default: auto)")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (not the one at creation)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def apply_global_options(args: argparse.Namespace) -> None:
    """Log level and progress mode of this command, from its global options."""
    quiet, verbose = bool(getattr(args, "quiet", False)), int(getattr(args, "verbose", 0) or 0)
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logger = logging.getLogger("facetron")
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    if quiet:  # the libraries' own warnings too (read when they are imported, after this)
        for variable in QUIET_LIBRARY_ENV:
            os.environ.setdefault(variable, "error")
    progress.set_mode("off" if quiet else getattr(args, "progress", progress.DEFAULT_PROGRESS))


def end_with_parent() -> None:
    """A command run as another process's stage (``$FACETRON_PARENT_PID``, set by the web app)
    ends when that process dies, even by SIGKILL: Linux's parent-death signal (SIGTERM), armed
    here; a parent already gone before it was armed ends the command at once."""
    parent = os.environ.get(PARENT_PID_ENV, "")
    if not parent.isdigit():
        return
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != int(parent):
        raise SystemExit(f"facetron: the process that started this command ({parent}) is gone")
