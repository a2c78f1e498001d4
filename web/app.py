"""The facetron web app (Gradio): photos -> prepare -> train -> style -> generate -> gallery.

It talks to Triton only through :mod:`facetron.client` (the ``portrait`` call
over the decoupled ``portrait_stream`` model, one progress report per
denoising step). Preparing and training run as subprocesses of the
``facetron train`` CLI (:mod:`facetron.web.stages`): no model code is loaded
into this process.

Every step is one handler: it checks its inputs first and raises one clear
message (a Gradio error toast naming the input and the rule) without
touching what the page already shows, so a bad upload, an unknown user or a
server that is down loses nothing: the uploads stay in the upload box, the
last gallery stays on the page, the last good photo set stays on disk.
Long steps are generators: they stream progress (a progress bar and a status
line) while the work runs in a worker thread.

Safe to expose (issue 21): the page has a login (Gradio's auth over
:mod:`facetron.web.auth`) and every handler acts only as the user the
session logged in as (``gr.Request.username``); the user-id field shows that
user and cannot be changed. Nothing of the work folder is served by path:
images go back as arrays and downloads as copies that Gradio puts in its own
cache, so a session sees only what it was handed. Uploads, training steps
and the queue are bounded (:mod:`facetron.web.limits`); training stages run
in their own process group and end with the page that started them, or
with the app (:func:`close`).
"""

from __future__ import annotations

import json
import os
import queue
import random
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # never phone home

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from facetron.client import FacetronClient  # noqa: E402
from facetron.client.requests import portrait_request  # noqa: E402
from facetron.contract import (  # noqa: E402
    CLIENT_NUM_IMAGES,
    DEFAULT_FUSION_STRENGTH,
    DEFAULT_GUIDANCE,
    DEFAULT_SCHEDULER,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SEED,
    MAX_STEPS,
    PORTRAIT_STREAM,
    SCHEDULERS,
    validate_user_id,
)
from facetron.errors import FacetronError, InvalidInputError, NotFoundError, ServerError  # noqa: E402
from facetron.imageio import load_image  # noqa: E402
from facetron.web import photos, results, stages  # noqa: E402
from facetron.web.limits import (  # noqa: E402
    MAX_TRAIN_STEPS,
    MAX_UPLOAD_FILE_BYTES,
    QUEUE_MAX_SIZE,
    STAGE_TIMEOUT_S,
)

DEFAULT_WEB_STEPS = 20
DEFAULT_TRAIN_STEPS = 300
REPORT_COLUMNS = ["photo", "kept", "reason"]
#: system fonts only: the page loads nothing from outside this machine
THEME_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
MONO_FONTS = ("ui-monospace", "monospace")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
#: Gradio's cache of what the page handed out (images, downloads): checked every 30 min, kept 3 h
CACHE_SWEEP = (1800, 3 * 3600)
#: downloads wait here (a private temp folder) until Gradio copies them into its cache
OUTBOX_KEEP_S = 600.0


@dataclass(frozen=True)
class WebConfig:
    """What the app serves against: one Triton gRPC endpoint, the user registry
    that server reads (training writes into it), and a working folder."""

    server: str
    work_dir: Path
    users_dir: Optional[Path] = None  # None: the CLI's default (FACETRON_USERS_DIR or build/users)
    base_model: Optional[Path] = None  # None: the tiny embedded model (what the default server runs)
    styles: tuple[str, ...] = ("studio",)
    default_style: str = "studio"
    default_steps: int = DEFAULT_WEB_STEPS
    default_train_steps: int = DEFAULT_TRAIN_STEPS
    timeout_s: float = 600.0
    stage_env: dict[str, str] = field(default_factory=dict)  # extra environment of the training subprocesses
    #: True: every session is logged in (launch with auth) and acts only as its user; False: single-user
    #: local use (--no-login): the user-id field is typed, and the app binds loopback only
    login: bool = True

    def user_dir(self, user_id: str) -> Path:
        return Path(self.work_dir) / "users" / validate_user_id(user_id)


# --- helpers ----------------------------------------------------------------------------


def _user(user_id: str) -> str:
    text = (user_id or "").strip()
    if not text:
        raise InvalidInputError("user id", "is empty: type the user's id (letters, digits, _ and -)")
    return validate_user_id(text, "user id")


def _message(exc: BaseException, server: str) -> str:
    """One line for the page: the input and the rule, or what is wrong with the server."""
    if isinstance(exc, ServerError):
        return (f"The Triton server at {server} did not answer: {exc}. "
                "Start it (facetron serve) or check --server; nothing on this page was lost.")
    if isinstance(exc, NotFoundError):
        return f"Not found: {exc}"
    if isinstance(exc, InvalidInputError):
        return f"{exc.input_name}: {exc.rule}"
    return str(exc)


def _parse_attrs(text: str) -> list[str]:
    attrs = [a.strip() for a in (text or "").replace(";", ",").split(",") if a.strip()]
    for a in attrs:
        key, sep, value = a.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InvalidInputError("attributes", f"{a!r} is not key=value (e.g. gender=woman, age=30s)")
    return attrs


def run_with_progress(work: Callable[[Callable[..., None]], Any]) -> Iterator[tuple[str, Any]]:
    """Run ``work(report)`` in a thread; yield ("progress", (done, total, label))
    for each report and finally ("done", result); re-raise the work's error."""
    events: queue.Queue = queue.Queue()

    def report(done: int, total: int, label: str = "") -> None:
        events.put(("progress", (int(done), int(total), label)))

    def target() -> None:
        try:
            events.put(("done", work(report)))
        except BaseException as exc:  # handed to the page's thread
            events.put(("error", exc))

    threading.Thread(target=target, daemon=True).start()
    while True:
        kind, value = events.get()
        if kind == "error":
            raise value
        yield kind, value
        if kind == "done":
            return


def _bar(progress: gr.Progress, done: int, total: int, label: str, unit: str) -> str:
    if total > 0:
        progress((done, total), desc=label, unit=unit)
    return f"{label}: {done}/{total} {unit}" if total > 0 else label


# --- the steps --------------------------------------------------------------------------


class WebApp:
    """The handlers behind the page (plain methods, also callable from tests)."""

    def __init__(self, config: WebConfig):
        self.config = config
        self._outbox = Path(tempfile.mkdtemp(prefix="facetron-web-out-"))  # 0700, this process's own

    # the session's user
    def session_user(self, typed: Optional[str], request: Optional[gr.Request]) -> str:
        """The user this call acts as: the session's login (a typed id must be that login, or empty);
        in single-user mode (no login) the typed id."""
        if not self.config.login:
            return _user(typed or "")
        login = getattr(request, "username", None) if request is not None else None
        if not login:
            raise InvalidInputError("login", "this session is not logged in: log in to the page first")
        typed = (typed or "").strip()
        if typed and typed != login:
            raise InvalidInputError("user id", f"this session is logged in as {login!r} and acts only as that "
                                               f"user, not {typed!r}")
        return validate_user_id(login, "login")

    def whoami(self, request: gr.Request) -> Any:
        """The user-id field at page load: the logged-in user (read-only), or left as typed without login."""
        if not self.config.login:
            return gr.skip()
        return getattr(request, "username", None) or ""

    def _hand_out(self, path: Path) -> str:
        """A copy of ``path`` in this app's private outbox (in the system temp folder, where Gradio takes
        returned files from): Gradio copies it into its cache for this session; the work folder is never
        served by path. Copies older than OUTBOX_KEEP_S are swept on each call."""
        now = time.time()
        for old in list(self._outbox.iterdir()):
            try:
                if now - old.stat().st_mtime > OUTBOX_KEEP_S:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
        folder = self._outbox / secrets.token_hex(16)
        folder.mkdir()
        return str(shutil.copy2(path, folder / Path(path).name))

    def close(self) -> int:
        """Stop every running stage and remove the outbox; returns how many stages were stopped."""
        stopped = stages.stop_all()
        shutil.rmtree(self._outbox, ignore_errors=True)
        return stopped

    # 0. server status
    def check_server(self, timeout_s: float = 5.0) -> None:
        """Raise ServerError unless the server is up and ``portrait_stream`` is ready."""
        with FacetronClient(self.config.server, timeout_s=timeout_s) as client:
            if not client.is_ready(timeout_s=timeout_s):
                raise ServerError("not reachable or not ready (no answer to a health check)")
            if not client.model_ready(PORTRAIT_STREAM.name, timeout_s=timeout_s):
                raise ServerError(f"the {PORTRAIT_STREAM.name!r} model is not ready on it")

    def server_status(self) -> str:
        try:
            self.check_server()
        except FacetronError as exc:
            return (f"**Server {self.config.server}: {exc}.** Generation fails until it is up; "
                    "preparing and training still work.")
        return f"Server {self.config.server}: ready."

    # 1-2. photos -> prepare report + contact sheet
    def prepare(self, user_id: str, files: Optional[Sequence[Any]], attributes: str,
                progress: gr.Progress = gr.Progress(), request: gr.Request = None) -> Iterator[tuple]:
        try:
            user = self.session_user(user_id, request)
            attrs = _parse_attrs(attributes)
            checked = photos.check_uploads(files)
            photos.require_photos(checked)
        except FacetronError as exc:
            raise gr.Error(_message(exc, self.config.server)) from None
        udir = self.config.user_dir(user)
        skipped = "".join(f"\n- skipped {name}: {why}" for name, why in checked.rejected)
        yield (f"Preparing {len(checked.photos)} photo(s) of **{user}**…{skipped}", gr.skip(), gr.skip())
        photos_dir = photos.stage_photos(checked.photos, udir / "photos")
        args = stages.prepare_args(photos_dir, user, udir / "prepared", self.config.users_dir, self.config.base_model,
                              attrs, min_photos=None)
        result, last = yield from self._stage(args, progress, "detect, align, check", "photos",
                                              "Preparing the photos failed",
                                              lambda bar: (bar + skipped, gr.skip(), gr.skip()))
        report = json.loads((udir / "prepared" / "report.json").read_text())
        rows = [[p["file"], "kept" if p["kept"] else "dropped", p.get("reason") or ""] for p in report["photos"]]
        status = (f"Prepared **{user}**: kept {report['kept']} of {len(rows)} photo(s) "
                  f"({result.seconds:.0f} s; progress {last[0]}/{last[1]} photos); the user is registered. "
                  f"Next: train.{skipped}")
        sheet = load_image(udir / "prepared" / "contact_sheet.png", "contact sheet")  # served as pixels, not a path
        yield (status, sheet, rows)

    def _stage(self, args: list[str], progress: gr.Progress, what: str, unit: str, failed: str,
               shape: Callable[[str], object]) -> Iterator:
        """Run one ``facetron train`` stage as a subprocess: yields ``shape(progress-bar text)`` per
        report; returns (its result, the last (done, total)); a failure is a gr.Error starting ``failed``."""
        last, result = (0, 0), None
        cancel = threading.Event()  # set when this generator ends early (the client went away): the stage stops
        try:
            for kind, value in run_with_progress(
                    lambda report: stages.run_stage(args, report, env=self.config.stage_env,
                                                    timeout_s=STAGE_TIMEOUT_S, cancel=cancel)):
                if kind == "progress":
                    last = value[:2]
                    yield shape(_bar(progress, value[0], value[1], what, unit))
                else:
                    result = value
        except FacetronError as exc:
            raise gr.Error(f"{failed}: {_message(exc, self.config.server)}") from None
        finally:
            cancel.set()
        return result, last

    # 3. training with a live progress bar
    def train(self, user_id: str, steps: Optional[float], progress: gr.Progress = gr.Progress(),
              request: gr.Request = None) -> Iterator[str]:
        try:
            user = self.session_user(user_id, request)
            n = int(steps) if steps else None
            if n is not None and not 1 <= n <= MAX_TRAIN_STEPS:
                raise InvalidInputError("training steps", f"must be in 1..{MAX_TRAIN_STEPS}, got {n}")
        except FacetronError as exc:
            raise gr.Error(_message(exc, self.config.server)) from None
        prepared = self.config.user_dir(user) / "prepared"
        if not (prepared / "dataset").is_dir():
            raise gr.Error(f"user id: no prepared photos of {user!r} here: upload photos and press Prepare first")
        args = stages.lora_args(prepared / "dataset", user, self.config.user_dir(user) / "lora", self.config.users_dir,
                           self.config.base_model, n, prepared / "reference_embedding.npy")
        yield f"Starting training of **{user}** (loading the base model)…"
        result, last = yield from self._stage(args, progress, "training the identity LoRA", "steps",
                                              "Training failed", lambda bar: bar)
        summary = next((ln.split("] ", 1)[1] for ln in result.stdout if ln.startswith("[train]") and "steps" in ln), "")
        yield (f"Trained **{user}** in {result.seconds:.0f} s ({summary}; progress {last[0]}/{last[1]} steps). "
               "The LoRA is installed in the user "
               "registry: the server uses it from the next request, no reload. Next: pick a style and generate.")

    # 4-5. style and options -> generation with per-step progress -> gallery
    def generate(self, user_id: str, style: str, prompt: str, num_images: float, top_k: float, steps: float,
                 guidance: float, seed: float, scheduler: str, template: Optional[str] = None,
                 fusion_strength: Optional[float] = None, progress: gr.Progress = gr.Progress(),
                 request: gr.Request = None) -> Iterator[tuple]:
        try:
            user = self.session_user(user_id, request)
            if template is not None:  # a file path: the pixel bound is checked from its header, then decoded
                name = "template photo"
                photos.check_bounds([Path(template)])
                photos.check_pixels(Path(template), name)
                template = load_image(template, name)
            seed_value = int(seed) if seed is not None and int(seed) >= 0 else random.randint(0, 2**31 - 1)
            request = dict(user_id=user, style=style or None, prompt=(prompt or "").strip() or None,
                           num_images=int(num_images), top_k=int(top_k) if top_k else None, steps=int(steps),
                           guidance=float(guidance), seed=seed_value, scheduler=scheduler or None,
                           template=None if template is None else np.ascontiguousarray(template[..., :3], np.uint8),
                           paste_template=True if template is not None else None,  # "the rest kept" (the UI's promise)
                           fusion_strength=None if fusion_strength is None else float(fusion_strength))
            portrait_request(**request)  # the client's own checks, before any call
        except FacetronError as exc:
            raise gr.Error(_message(exc, self.config.server)) from None
        skip = (gr.skip(), gr.skip(), gr.skip())
        yield (*skip, f"Generating {request['num_images']} candidate(s) for **{user}** (seed {seed_value})…")

        def call(report: Callable[..., None]):
            with FacetronClient(self.config.server, timeout_s=self.config.timeout_s) as client:
                return client.portrait(**request, on_progress=lambda d, t: report(d, t, "denoising"),
                                       timeout_s=self.config.timeout_s)

        last = (0, 0)
        try:
            self.check_server()
            for kind, value in run_with_progress(call):
                if kind == "progress":
                    last = value[:2]
                    yield (*skip, _bar(progress, value[0], value[1], "denoising", "steps"))
                else:
                    answer = value
        except FacetronError as exc:
            raise gr.Error(_message(exc, self.config.server)) from None
        except Exception as exc:  # a transport failure the client did not translate: still one clear line
            raise gr.Error(_message(ServerError(f"{type(exc).__name__}: {exc}"), self.config.server)) from None
        saved = {k: v for k, v in request.items() if v is not None and k != "template"}
        if template is not None:
            saved["template"] = f"uploaded image {template.shape[1]}x{template.shape[0]}"
        run = results.save_run(Path(self.config.work_dir) / "portraits", user, answer, saved, seed_value)
        gallery = [(load_image(p, p.name), c) for p, c in zip(run.images, run.captions)]  # pixels, not paths
        summary = run.summary + f" Denoising progress streamed: {last[0]}/{last[1]} steps."
        if not gallery:
            summary += (" No candidate passed the face check (exactly one clear face): see the table. "
                        + ("Try another seed or more candidates." if template is not None else
                           "Add a template photo (its face region is generated and the user's face fused in)."))
        yield gallery, run.rows, self._hand_out(run.zip_path), summary


# --- the page ---------------------------------------------------------------------------


def build_app(config: WebConfig) -> gr.Blocks:
    """The Gradio page over :class:`WebApp`'s handlers (api names: prepare, train, generate, status)."""
    web = WebApp(config)
    styles = list(config.styles) or [config.default_style]
    with gr.Blocks(title="facetron portraits", analytics_enabled=False, delete_cache=CACHE_SWEEP) as app:
        app.facetron_web = web  # close(app) stops its stages
        gr.Markdown("# facetron — personalized portraits\n"
                    "Upload photos of one person, check what was kept, train their identity LoRA, pick a style "
                    "and generate. Portraits come from the Triton server over gRPC; training runs the "
                    "`facetron train` commands on this machine.")
        status = gr.Markdown(elem_id="server-status")
        if config.login:  # the session's login, shown; every handler acts only as that user
            user = gr.Textbox(label="Logged in as", elem_id="user-id", max_lines=1, interactive=False)
        else:
            user = gr.Textbox(label="User id", placeholder="alice", elem_id="user-id", max_lines=1)
        with gr.Tab("1 · Photos", elem_id="tab-photos"):
            with gr.Row():
                files = gr.File(label="Photos of one person (3 or more; JPEG, PNG, …)", file_count="multiple",
                                elem_id="photos")
                attrs = gr.Textbox(label="Attributes for captions (optional)", placeholder="gender=woman, age=30s",
                                   elem_id="attributes", max_lines=1)
            prepare_btn = gr.Button("Prepare photos", variant="primary", elem_id="prepare-btn")
            prepare_status = gr.Markdown(elem_id="prepare-status")
            with gr.Row():
                sheet = gr.Image(label="Contact sheet (kept / dropped and why)", type="numpy", format="png",
                                 elem_id="contact-sheet")
                report = gr.Dataframe(headers=REPORT_COLUMNS, label="Prepare report", interactive=False,
                                      elem_id="prepare-report")
        with gr.Tab("2 · Train", elem_id="tab-train"):
            train_steps = gr.Number(label=f"Training steps (at most {MAX_TRAIN_STEPS})",
                                    value=min(config.default_train_steps, MAX_TRAIN_STEPS), precision=0,
                                    minimum=1, maximum=MAX_TRAIN_STEPS, elem_id="train-steps")
            train_btn = gr.Button("Train identity LoRA", variant="primary", elem_id="train-btn")
            train_status = gr.Markdown(elem_id="train-status")
        with gr.Tab("3 · Style and generate", elem_id="tab-generate"):
            with gr.Row():
                style = gr.Dropdown(styles, value=config.default_style if config.default_style in styles else styles[0],
                                    label="Style", allow_custom_value=True, elem_id="style")
                scheduler = gr.Dropdown(list(SCHEDULERS), value=DEFAULT_SCHEDULER, label="Sampler", elem_id="scheduler")
            with gr.Row():
                prompt = gr.Textbox(label="Prompt (optional; {trigger} = the user; empty = the style's)",
                                    elem_id="prompt", scale=3)
                template = gr.Image(label="Template photo (optional): its face region is generated, the rest kept",
                                    # a path, undecoded (image_mode None): the pixel bound is checked first
                                    type="filepath", image_mode=None, sources=["upload"], elem_id="template",
                                    height=160, scale=1)
            with gr.Row():
                num_images = gr.Number(label="Candidates", value=CLIENT_NUM_IMAGES, precision=0, minimum=1,
                                       maximum=MAX_IMAGES, elem_id="num-images")
                top_k = gr.Number(label="Keep best (0 = all)", value=0, precision=0, minimum=0, maximum=MAX_IMAGES,
                                  elem_id="top-k")
                steps = gr.Number(label="Denoising steps", value=config.default_steps, precision=0, minimum=1,
                                  maximum=MAX_STEPS, elem_id="steps")
                guidance = gr.Number(label="Guidance", value=DEFAULT_GUIDANCE, minimum=0, maximum=MAX_GUIDANCE,
                                     elem_id="guidance")
                seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, minimum=-1, maximum=MAX_SEED,
                                 elem_id="seed")
                fusion = gr.Number(label="Fusion strength (user's photo in each face; 0 = off)",
                                   value=DEFAULT_FUSION_STRENGTH, minimum=0, maximum=1, elem_id="fusion-strength")
            generate_btn = gr.Button("Generate portraits", variant="primary", elem_id="generate-btn")
            generate_status = gr.Markdown(elem_id="generate-status")
            gallery = gr.Gallery(label="Portraits, best first (similarity to the user, seed)", columns=4,
                                 height=360, object_fit="contain", preview=False, format="png", elem_id="gallery")
            table = gr.Dataframe(headers=results.TABLE_COLUMNS, label="Every candidate", interactive=False,
                                 elem_id="candidates")
            download = gr.File(label="Download (PNGs + result.json)", elem_id="download")

        app.load(web.server_status, None, status, api_name="status")
        app.load(web.whoami, None, user, api_name="whoami")
        prepare_btn.click(web.prepare, [user, files, attrs], [prepare_status, sheet, report], api_name="prepare")
        train_btn.click(web.train, [user, train_steps], train_status, api_name="train")
        generate_btn.click(web.generate, [user, style, prompt, num_images, top_k, steps, guidance, seed, scheduler,
                                          template, fusion],
                           [gallery, table, download, generate_status], api_name="generate")
    # one training or generation at a time on this machine; a full queue refuses new jobs at once
    app.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)
    return app


def theme() -> gr.themes.Base:
    return gr.themes.Default(font=list(THEME_FONTS), font_mono=list(MONO_FONTS))


def check_launch(config: WebConfig, host: str, auth: Optional[Callable[[str, str], bool]]) -> None:
    """Refuse a launch that would expose the page: login on and no auth; no login on a non-loopback
    address; a work folder inside Gradio's cache (which Gradio serves by path)."""
    if config.login and auth is None:
        raise InvalidInputError("--credentials", "no logins configured: give a credentials file (facetron web "
                                                  "--add-login USER), or --no-login for single-user local use")
    if not config.login and host not in LOOPBACK_HOSTS:
        raise InvalidInputError("--no-login", f"serves loopback only (127.0.0.1), not {host}: configure logins")
    cache = Path(gr.utils.get_upload_folder()).resolve()
    work = Path(config.work_dir).resolve()
    if work == cache or cache in work.parents or work in cache.parents:
        raise InvalidInputError("--work", f"{work} overlaps Gradio's cache folder {cache}, which is served by path")


def launch(config: WebConfig, host: str = "127.0.0.1", port: Optional[int] = None, block: bool = True,
           auth: Optional[Callable[[str, str], bool]] = None):
    """Serve the page on ``host:port`` (loopback by default) behind ``auth`` (Gradio's ``auth``: a
    ``(user, password) -> bool`` callable). Returns the app; end it with :func:`close`. No folder is
    served by path (no allowed_paths): Gradio serves only the copies in its cache it handed out."""
    check_launch(config, host, auth)
    app = build_app(config)
    app.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=True,
               show_error=True, ssr_mode=False, theme=theme(), auth=auth, max_file_size=MAX_UPLOAD_FILE_BYTES,
               footer_links=["api"], run_history=False)
    return app


def close(app: gr.Blocks) -> int:
    """Close the page: stop every training stage it started (whole process groups), then the server.
    Returns how many stages were stopped."""
    web = getattr(app, "facetron_web", None)
    stopped = web.close() if web is not None else stages.stop_all()
    app.close()
    return stopped
