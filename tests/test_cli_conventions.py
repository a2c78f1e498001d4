"""The ``facetron`` CLI follows its conventions (facetron/cli/conventions.py):
every option of every subcommand has help text and shows its default (never
as an absolute path into the checkout); ``--version`` works; enumerated
options refuse a bad value at parse time, before any work; the data root
(``FACETRON_HOME``, else XDG) moves every default output; one meaning per
option name; progress is one line per stage off a terminal; global -q / -v."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from facetron import contract, progress
from facetron.cli import build_parser, main
from facetron.cli.conventions import QUIET_LIBRARY_ENV, HelpFormatter, options_without_help, walk
from facetron.paths import REPO_ROOT, data_root


@pytest.fixture(autouse=True)
def _progress_mode_restored():
    """The CLI sets the process's progress mode and the libraries' switches: put them back."""
    keys = (progress.LIBRARY_BARS_ENV, *QUIET_LIBRARY_ENV)
    saved = {k: os.environ.get(k) for k in keys}
    yield
    progress.set_mode(progress.DEFAULT_PROGRESS)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _actions(parser: argparse.ArgumentParser):
    for path, p in walk(parser):
        for action in p._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                yield path, p, action


def _leaf(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for found, p in walk(parser):
        if found[1:] == path:
            return p
    raise KeyError(path)


def _choices(parser: argparse.ArgumentParser, path: tuple[str, ...], option: str) -> tuple:
    action = next(a for a in _leaf(parser, *path)._actions if option in a.option_strings)
    return tuple(action.choices)


# --- help text ------------------------------------------------------------------------


def test_every_option_of_every_subcommand_has_help() -> None:
    parser = build_parser()
    assert len(list(walk(parser))) > 40  # the walk reaches the nested subcommands
    assert options_without_help(parser) == []


def test_the_help_check_fails_on_an_option_without_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    injected = sub.add_parser("injected", help="a command with one undocumented option")
    injected.add_argument("--documented", help="has help")
    injected.add_argument("--undocumented")
    nested = injected.add_subparsers(dest="x").add_parser("deeper")
    nested.add_argument("thing")
    assert options_without_help(parser) == ["facetron injected --undocumented", "facetron injected deeper thing"]


def test_defaults_are_shown_and_never_as_paths_into_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACETRON_HOME", str(REPO_ROOT / "build"))  # as the Makefile sets it
    parser = build_parser()
    for path, p, action in _actions(parser):
        shown = HelpFormatter(p.prog)._expand_help(action)
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS, []) \
                and not isinstance(action, argparse._CountAction):
            assert "default" in shown, (path, action.option_strings, shown)
    for path, p in walk(parser):
        text = p.format_help()
        assert str(REPO_ROOT) not in text, path
    demo = _leaf(parser, "demo").format_help()
    assert "$FACETRON_HOME/outputs/demo" in demo.replace("\n", " ").replace("  ", "")


def readme_commands() -> set[tuple[str, ...]]:
    """The commands the README's CLI table names: ``facetron a b|c`` -> ("a", "b"), ("a", "c")."""
    import re

    section = (REPO_ROOT / "README.md").read_text().split("\n## CLI\n", 1)[1].split("\n## ", 1)[0]
    found = set()
    for cell in re.findall(r"^\| `facetron ([a-z][^`]*)`", section, re.M):
        words = cell.replace("\\|", "|").split()
        first = words[0]
        subs = words[1].split("|") if len(words) > 1 and re.fullmatch(r"[a-z][a-z-]*(\|[a-z][a-z-]*)*", words[1]) else []
        found |= {(first, s) for s in subs} | {(first,)}
    return found


def test_the_readme_lists_every_command() -> None:
    leaves = {path[1:] for path, p in walk(build_parser()) if len(path) > 1 and not any(
        isinstance(a, argparse._SubParsersAction) for a in p._actions)}
    assert leaves - readme_commands() == set()


# --- version ----------------------------------------------------------------------------


def test_version_prints_the_installed_distribution_version() -> None:
    script = Path(sys.executable).with_name("facetron")
    assert script.is_file(), f"{script}: the console script is not installed in this environment"
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"facetron {metadata.version('facetron')}"


# --- enumerated options -------------------------------------------------------------------


def test_enumerated_choices_come_from_the_contract() -> None:
    parser = build_parser()
    runtimes, precisions = ("auto",) + contract.NET_RUNTIMES, contract.NET_PRECISIONS + ("auto",)
    for path in (("demo",), ("export", "repository")):
        assert _choices(parser, path, "--cpu-runtime") == runtimes
        assert _choices(parser, path, "--precision") == precisions
    assert _choices(parser, ("generate",), "--scheduler") == contract.SCHEDULERS
    assert _choices(parser, ("export", "repository"), "--identity-mode") == contract.IDENTITY_MODES
    assert _choices(parser, ("export", "repository"), "--int8") == contract.INT8_MODES


@pytest.mark.parametrize("argv, option", [
    (["demo", "--cpu-runtime", "tensorrt"], "--cpu-runtime"),
    (["demo", "--precision", "fp8"], "--precision"),
    (["export", "repository", "--cpu-runtime", "torch"], "--cpu-runtime"),
    (["export", "repository", "--int8", "maybe"], "--int8"),
    (["export", "repository", "--identity-mode", "both"], "--identity-mode"),
    (["export", "repository", "--target", "tpu"], "--target"),
    (["generate", "--user", "u", "--scheduler", "pndm"], "--scheduler"),
    (["train", "lora", "DATASET", "--user", "u", "--mixed-precision", "fp8"], "--mixed-precision"),
    (["serve", "--model-control", "sometimes"], "--model-control"),
    (["--progress", "loud", "users", "list"], "--progress"),
    (["users", "list", "--progress", "loud"], "--progress"),
])
def test_a_bad_enumerated_value_is_refused_at_parse_time(argv: list[str], option: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    where = {"demo": ["--out", str(out), "--build", str(tmp_path / "build")], "export": ["--out", str(out)],
             "generate": ["--out", str(out)], "train": ["--out", str(out)]}
    with pytest.raises(SystemExit) as exc:
        main(argv + where.get(argv[0], []))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: argument {option}: invalid choice" in err, err
    assert not out.exists() and not (tmp_path / "build").exists(), "work started before the check"


# --- one meaning per option name --------------------------------------------------------------


def test_one_meaning_per_option_name() -> None:
    meanings = {"--steps": "denoising", "--train-steps": "training", "--num-images": "images generated"}
    seen = {name: [] for name in meanings}
    for path, _p, action in _actions(build_parser()):
        assert "--num" not in action.option_strings, f"{' '.join(path)}: --num says nothing of what it counts"
        for name, word in meanings.items():
            if name in action.option_strings:
                assert word in action.help, (path, name, action.help)
                seen[name].append(path)
    assert {("facetron", "generate"), ("facetron", "demo"), ("facetron", "evaluate"),
            ("facetron", "web")} <= set(seen["--steps"])
    assert {("facetron", "train", "lora"), ("facetron", "demo"), ("facetron", "web")} <= set(seen["--train-steps"])


def test_the_web_app_stages_parse_as_the_cli_reads_them(tmp_path: Path) -> None:
    from facetron.web.stages import lora_args, prepare_args

    parser = build_parser()
    lora = parser.parse_args(lora_args(tmp_path / "ds", "u", tmp_path / "out", tmp_path / "users", None, 7))
    assert lora.train_steps == 7 and lora.progress == "bars"  # the web app parses the child's bars
    prep = parser.parse_args(prepare_args(tmp_path / "photos", "u", tmp_path / "p", None, None))
    assert prep.progress == "bars"


# --- the data root ---------------------------------------------------------------------------


def test_facetron_home_moves_every_default_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("FACETRON_HOME", str(home))
    parser = build_parser()
    assert parser.parse_args(["demo"]).out == home / "outputs" / "demo"
    assert parser.parse_args(["demo"]).build == home / "demo"
    assert parser.parse_args(["serve"]).repo == home / "model_repository"
    assert parser.parse_args(["serve"]).admin_key_file == home / "admin-key"
    assert parser.parse_args(["export", "repository"]).out == home / "model_repository"
    assert parser.parse_args(["train", "lora", "DS", "--user", "u"]).out == home / "loras"
    assert parser.parse_args(["web"]).work == home / "web"


def test_the_data_root_never_defaults_into_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FACETRON_HOME", "FACETRON_BUILD_DIR", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert data_root() == tmp_path / "h" / ".local" / "share" / "facetron"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_root() == tmp_path / "xdg" / "facetron"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")  # the XDG spec ignores relative paths
    assert data_root() == tmp_path / "h" / ".local" / "share" / "facetron"
    for path, _p, action in _actions(build_parser()):
        if isinstance(action.default, Path):
            assert not action.default.is_relative_to(REPO_ROOT), (path, action.option_strings, action.default)


def test_facetron_home_moves_the_user_registry(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("FACETRON_USERS_DIR", "FACETRON_BUILD_DIR")}
    env["FACETRON_HOME"] = str(tmp_path / "home")
    done = subprocess.run([sys.executable, "-m", "facetron.cli", "users", "delete", "nobody"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().endswith(f"no user 'nobody' in {tmp_path / 'home' / 'users'}"), done.stderr
    assert not (REPO_ROOT / "build" / "users" / "nobody").exists()


def test_faces_select_reads_users_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["faces", "select", "x.png", "--user", "u", "--users-dir", str(tmp_path)])
    assert args.users_dir == tmp_path
    assert main(["faces", "select", str(tmp_path), "--user", "u", "--users-dir", str(tmp_path),
                 "--server", "127.0.0.1:1"]) == 2
    assert "--users-dir: with --server the server reads its own user registry" in capsys.readouterr().err


# --- progress and the global options -----------------------------------------------------------


def test_progress_off_a_terminal_is_one_line_per_stage(capsys: pytest.CaptureFixture[str]) -> None:
    progress.set_mode("auto")
    assert progress.mode() == "lines"  # pytest's captured stderr is no terminal
    bar = progress.progress_bar(range(300), desc="lora astro", unit="step")
    bar.set_postfix(loss="0.1234")
    assert sum(1 for _ in bar) == 300
    with progress.progress_bar(desc="prepare photos", total=12, unit="photo") as stage:
        stage.update(12)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("lora astro: 300/300 step in ") and err[0].endswith("(loss=0.1234)")
    assert err[1].startswith("prepare photos: 12/12 photo in ")
    progress.set_mode("off")
    list(progress.progress_bar(range(5), desc="quiet", unit="it"))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv, level, mode", [
    (["users", "list"], logging.WARNING, "auto"),
    (["-q", "users", "list"], logging.ERROR, "off"),
    (["users", "list", "-q"], logging.ERROR, "off"),
    (["-vv", "users", "list"], logging.DEBUG, "auto"),
    (["users", "list", "-v"], logging.INFO, "auto"),
    (["--progress", "bars", "users", "list"], logging.WARNING, "bars"),
])
def test_global_quiet_and_verbose(argv: list[str], level: int, mode: str, tmp_path: Path) -> None:
    for k in (progress.LIBRARY_BARS_ENV, *QUIET_LIBRARY_ENV):
        os.environ.pop(k, None)
    assert main(argv + ["--users-dir", str(tmp_path)]) == 0
    assert logging.getLogger("facetron").level == level
    assert progress._mode == mode
    quiet = mode == "off"
    assert all((os.environ.get(k) == "error") == quiet for k in QUIET_LIBRARY_ENV)
    # the model-loading bars of huggingface_hub / transformers follow: on only where facetron draws bars
    assert (os.environ.get(progress.LIBRARY_BARS_ENV) == "1") == (progress.mode() != "bars")
