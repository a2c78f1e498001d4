"""``facetron users list|show|token|delete``: the user registry (facetron.users).

``users token USER [--rotate|--revoke]`` issues, rotates or revokes the
user's secret token (the registry keeps its hash; the token goes to the
operator's token store, :mod:`facetron.token_store`).

``users delete USER --purge`` removes every trace of a user that facetron made
(:func:`purge_user`): registry versions, the web app's work folder, training
outputs under the data root, merged ``unet_user_<id>`` models, the token store's token. It removes only
what facetron made (its marker, its sidecar, or its own layout) and reports
anything else that names the user, untouched.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from facetron.atomic import owned_folder, remove_tree
from facetron.cli.options import add_users_dir
from facetron.contract import USER_TOKEN_HEADER, merged_unet_name
from facetron.errors import NotFoundError
from facetron.paths import HOME_SHOWN, data_root
from facetron.token_store import TokenStore, issue_kept, tokens_dir
from facetron.users import UserRegistry, registry_at, validate_user_id

#: the web app's work folder layout (facetron.web.app.WebConfig.user_dir, facetron.web.results.save_run)
WEB_USERS, WEB_PORTRAITS, WEB_RESULT = "users", "portraits", "result.json"
#: what the web app keeps in a user's folder: staged photos, `train prepare` output, `train lora` output
WEB_PHOTOS, WEB_PREPARED, WEB_LORA = "photos", "prepared", "lora"
#: `train lora --select-by-identity` writes these beside the LoRA (facetron.training.identity_select)
SELECTION_FILES = ("identity_selection.json", "identity_selection.md", "identity_selection.png")
#: `facetron evaluate`'s default output per user, and what it writes there (facetron.benchmarks.identity)
EVALUATE_FILES = ("identity_report.json", "identity_report.md", "identity_report.png")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("users", help="list, show or delete registered users; issue, rotate or revoke their tokens")
    nested = p.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    ls = nested.add_parser("list", help="registered users, one per line (id, version, LoRA yes/no)")
    add_users_dir(ls)
    ls.set_defaults(func=run_list)
    show = nested.add_parser("show", help="one user's served version and files, as JSON")
    show.add_argument("user", help="user id")
    add_users_dir(show)
    show.set_defaults(func=run_show)
    tok = nested.add_parser(
        "token", help="issue, rotate or revoke a user's secret token (every served call as the user needs it)",
        description="Every served model that reads a user answers only a caller holding the user's token (the "
                    f"gRPC header {USER_TOKEN_HEADER}); a missing or wrong one gets the same NOT_FOUND as an unknown "
                    "user. The registry keeps only the token's SHA-256; the token itself is printed once and kept in "
                    "the operator's token store (default $FACETRON_TOKENS_DIR, else tokens/ under the data root), "
                    "where the client, the demo and the web app find it.")
    tok.add_argument("user", help="user id")
    add_users_dir(tok)
    what = tok.add_mutually_exclusive_group()
    what.add_argument("--rotate", action="store_true", help="issue a new token; the old one stops working at once")
    what.add_argument("--revoke", action="store_true",
                      help="remove the user's token: no call acts as the user until a new one is issued")
    tok.add_argument("--no-save", dest="save", action="store_false",
                     help="print the new token only; do not keep it in the operator's token store")
    tok.set_defaults(func=run_token)
    rm = nested.add_parser(
        "delete", help="remove a user and all its versions (served nowhere after this); --purge: every trace",
        description="Remove the user from the registry. With --purge, remove every trace facetron made of the user: "
                    "every registry version, the web app's work folder for the user (photos, prepared, lora, "
                    "portraits), training outputs under the data root (prepared/<user>, loras/<user>.*, the demo's), "
                    "merged unet_user_<id> models in assembled repositories, and the user's token (its hash goes with the "
                    "registry folder, the token itself from the operator's token store). Prints each path removed; anything "
                    "facetron did not make is reported and kept.")
    rm.add_argument("user", help="user id")
    add_users_dir(rm)
    rm.add_argument("--purge", action="store_true", help="remove every trace of the user, not just the registry")
    rm.add_argument("--web-work", type=Path, default=None,
                    help=f"the web app's work folder (default: {HOME_SHOWN}/web, the default of facetron web --work)")
    rm.add_argument("--repo", type=Path, action="append", default=None, metavar="DIR",
                    help=f"an assembled model repository; repeat for several (default: {HOME_SHOWN}/model_repository "
                         f"and {HOME_SHOWN}/demo/model_repository)")
    rm.set_defaults(func=run_delete)


def run_list(args: argparse.Namespace) -> int:
    registry = registry_at(args.users_dir)
    for user in registry.users():
        info = registry.describe(user)
        print(f"{user}\t{info['version']}\tlora={'yes' if info['has_lora'] else 'no'}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    registry = registry_at(args.users_dir)
    print(json.dumps(registry.describe(validate_user_id(args.user, "user")), indent=2))
    return 0


def ensure_token(registry: UserRegistry, user: str, store: TokenStore | None = None) -> str | None:
    """Registration's part: a user without a token gets one, kept in the operator's token store
    (printed where it is); None when the user had one already."""
    if registry.has_token(user):
        return None
    token, path = issue_kept(registry, user, store)
    print(f"issued a token for user {user!r}, kept in {path} (the client reads it from there)")
    return token


def run_token(args: argparse.Namespace) -> int:
    registry = registry_at(args.users_dir)
    user = validate_user_id(args.user, "user")
    if not registry.exists(user):
        raise NotFoundError(f"user: no user {user!r} in {registry.root}")
    store = TokenStore()
    if args.revoke:
        had = registry.revoke_token(user)
        store.remove(user)
        print(f"revoked the token of user {user!r}" if had else f"user {user!r} had no token")
        return 0
    if registry.has_token(user) and not args.rotate:
        kept = store.get(user)
        where = f"kept in {store.path(user)}" if kept else "not in this token store"
        print(f"user {user!r} has a token ({where}); --rotate issues a new one, --revoke removes it")
        return 0
    token = registry.issue_token(user)
    if args.save:
        print(f"kept in {store.put(user, token)}", file=sys.stderr)
    print(token)
    return 0


def run_delete(args: argparse.Namespace) -> int:
    registry = registry_at(args.users_dir)
    user = validate_user_id(args.user, "user")
    places = Places.of(args)
    if args.purge:
        report = purge_user(user, places)
        if not report.removed and not report.kept:
            where = ", ".join(map(str, places.registries))
            raise NotFoundError(f"user: no trace of user {user!r} (registries {where}; web work {places.web_work}; "
                                f"data root {places.home})")
        for path in report.removed:
            print(f"removed {path}")
        for path, why in report.kept:
            print(f"kept    {path}: {why}; facetron removes only what it made: delete it yourself if it is this user's")
        if report.merged:
            print("note: a running server that loaded a merged model keeps it until it unloads it or restarts")
        return 0
    if not registry.delete(user):
        raise NotFoundError(f"user: no user {user!r} in {registry.root}")
    print(f"deleted user {user!r} from {registry.root}")
    left = traces(user, places)
    if left:
        print(f"left behind ({len(left)}; remove with: facetron users delete {user} --purge):")
        for path in left:
            print(f"  {path}")
    return 0


# --- purge ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Places:
    """Where facetron keeps a user's traces: the registries, the web app's work folder, the data
    root (training outputs) and the assembled repositories."""

    registries: tuple[Path, ...]
    web_work: Path
    home: Path
    repos: tuple[Path, ...]
    tokens: Path = field(default_factory=tokens_dir)  # the operator's token store

    @classmethod
    def of(cls, args: argparse.Namespace) -> "Places":
        home = data_root()
        registries = _unique([registry_at(args.users_dir).root, home / "demo" / "users"])
        repos = _unique(args.repo or [home / "model_repository", home / "demo" / "model_repository"])
        return cls(tuple(registries), Path(args.web_work or home / "web"), home, tuple(repos))

    def lora_folders(self, user: str) -> list[Path]:
        """Where `train lora` writes ``<user>.*``: its default --out, the demo's, the web app's."""
        return _unique([self.home / "loras", self.home / "demo" / "loras", self.web_user(user) / WEB_LORA])

    def web_user(self, user: str) -> Path:
        return self.web_work / WEB_USERS / user


def _unique(paths: list[Path]) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        key = Path(p).resolve()
        if key not in seen:
            seen.add(key)
            out.append(Path(p))
    return out


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def traces(user: str, places: Places) -> list[Path]:
    """Every path facetron's layout gives the user that exists (nothing is read or removed)."""
    found: list[Path] = []
    for root in places.registries:
        leftover = re.compile(rf"\.deleted-{re.escape(user)}-[a-z0-9_]+")  # UserRegistry.delete's temp names
        found += [root / user] + sorted(p for p in (root.iterdir() if root.is_dir() else [])
                                        if leftover.fullmatch(p.name))
    found += [places.web_user(user), places.web_work / WEB_PORTRAITS / user, places.home / "prepared" / user,
              places.home / "outputs" / "evaluate" / user]
    for folder in places.lora_folders(user)[:2]:  # the web one is inside web_user
        found += sorted(folder.glob(f"{user}.*")) if folder.is_dir() else []
    found += [repo / merged_unet_name(user) for repo in places.repos]
    found += [TokenStore(places.tokens).path(user)]
    return [p for p in found if _exists(p)]


@dataclass
class PurgeReport:
    removed: list[Path] = field(default_factory=list)
    kept: list[tuple[Path, str]] = field(default_factory=list)  # (path, why): not made by facetron
    merged: bool = False

    def remove(self, path: Path, why_not: str | None) -> bool:
        """Remove ``path`` when ``why_not`` is None (facetron made it), else report it kept."""
        if why_not is not None:
            self.kept.append((path, why_not))
            return False
        remove_tree(path)
        self.removed.append(path)
        return True

    def remove_if_empty(self, folder: Path) -> None:
        """A layout folder facetron made for the user: removed once empty, else what is left is reported."""
        if not folder.is_dir() or folder.is_symlink():
            return
        left = sorted(folder.iterdir())
        if not left:
            folder.rmdir()
            self.removed.append(folder)
        for p in left:
            if not any(p == k for k, _ in self.kept):
                self.kept.append((p, "not a file facetron's layout puts here"))


def purge_user(user: str, places: Places) -> PurgeReport:
    """Remove every trace of ``user`` facetron made; report what it did not make. Each step names the
    rule by which a path is facetron's: the registry's layout, the folder marker
    (facetron.atomic.ARTIFACT_MARKER), a LoRA's sidecar naming it, or the web app's layout."""
    from facetron.export.repository import remove_merged_user
    from facetron.training.train_lora import OutputPaths

    user = validate_user_id(user, "user")
    report = PurgeReport()
    # 1. the registries: every version of the user (the older ones kept for grace too)
    for root in places.registries:
        report.removed += UserRegistry(root).purge(user)
    # 2. train lora outputs <user>.safetensors/.json/.ckpt/.candidates: facetron's by their sidecar / marker
    for folder in places.lora_folders(user):
        if not folder.is_dir():
            continue
        outputs = OutputPaths.for_user(folder, user).present()
        named = {p for p, _ in outputs}
        for path, why_not in outputs:
            report.remove(path, why_not)
        for path in sorted(folder.glob(f"{user}.*")):
            if path not in named:
                report.kept.append((path, "not an output of facetron train lora"))
    # 3. training outputs by marker: `train prepare`'s default --out
    prepared = places.home / "prepared" / user
    if _exists(prepared):
        report.remove(prepared, None if owned_folder(prepared) else "a folder facetron did not make (no marker)")
    _purge_evaluate(user, places.home / "outputs" / "evaluate" / user, report)
    # 4. the web app's work folder: the user's folder and portraits, by the app's layout
    _purge_web_user(user, places.web_user(user), report)
    _purge_web_portraits(user, places.web_work / WEB_PORTRAITS / user, report)
    # 5. merged unet_user_<id> models in assembled repositories (and their local engine caches)
    for repo in places.repos:
        removed, kept = remove_merged_user(repo, user)
        report.removed += removed
        report.kept += kept
        report.merged = report.merged or bool(removed)
    # 6. the operator's token store: the user's token (its hash went with the registry folder)
    token = TokenStore(places.tokens).path(user)
    if token.is_file() and not token.is_symlink():
        report.remove(token, None)
    return report


def _purge_web_user(user: str, udir: Path, report: PurgeReport) -> None:
    """``<work>/users/<user>/``: photos (the app's staged copies), prepared (marker), lora (train lora
    outputs, already purged, and the identity-selection files), and the writers' temp leftovers."""
    if not udir.is_dir() or udir.is_symlink():
        return
    temp = re.compile(rf"\.({WEB_PHOTOS}|{WEB_PREPARED}|{WEB_LORA})\..+")  # stage_photos / atomic_dir temp names
    for entry in sorted(udir.iterdir()):
        if entry.name == WEB_PHOTOS and entry.is_dir() and not entry.is_symlink():
            report.remove(entry, None)
        elif entry.name == WEB_PREPARED:
            report.remove(entry, None if owned_folder(entry) else "a folder facetron did not make (no marker)")
        elif entry.name == WEB_LORA and entry.is_dir() and not entry.is_symlink():
            for name in SELECTION_FILES:
                if (entry / name).is_file() and not (entry / name).is_symlink():
                    report.remove(entry / name, None)
            report.remove_if_empty(entry)
        elif temp.fullmatch(entry.name) and not entry.is_symlink():
            report.remove(entry, None)
    report.remove_if_empty(udir)


def _purge_web_portraits(user: str, folder: Path, report: PurgeReport) -> None:
    """``<work>/portraits/<user>/<time>/``: one folder per generation, its result.json naming the user."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for run in sorted(folder.iterdir()):
        result = run / WEB_RESULT
        ours = run.is_dir() and not run.is_symlink() and result.is_file() and _json_user(result) == user
        report.remove(run, None if ours else f"not a portrait run of the web app (no {WEB_RESULT} naming {user!r})")
    report.remove_if_empty(folder)


def _purge_evaluate(user: str, folder: Path, report: PurgeReport) -> None:
    """``$FACETRON_HOME/outputs/evaluate/<user>``: marked, or only evaluate's report files naming the user."""
    if not _exists(folder):
        return
    ours = owned_folder(folder) or (
        folder.is_dir() and not folder.is_symlink() and _json_user(folder / EVALUATE_FILES[0]) == user
        and all(p.name in EVALUATE_FILES for p in folder.iterdir()))
    report.remove(folder, None if ours else "a folder facetron did not make (no marker, not only evaluate's report)")


def _json_user(path: Path) -> str | None:
    """The ``user_id`` a JSON object records (None if it is not one)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        return None
    return doc.get("user_id") if isinstance(doc, dict) else None
