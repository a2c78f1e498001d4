"""``facetron generate``: portraits of a user from running Triton servers.

One ``portrait`` call through a :class:`~facetron.client.pool.ServerPool`
(``--server h:p[,h:p]``: round-robin + failover). Writes into ``--out``:

* ``portrait_00.png`` ... — the returned (top-k) images, best first;
* ``grid.png`` — the same images in a grid labelled with rank and both
  similarities (the generated face's, which ranks, and the returned
  picture's after fusion);
* ``result.json`` — request, per-candidate scores/ranks, selection, the
  server's report (which similarity ranked, fusion, the seed used), client
  timings, servers used (written last).

Every file is written atomically. Errors (bad argument, unknown user or
model, no server reachable) are one line and exit 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from facetron.client.grpc_client import DEFAULT_URL, RetryPolicy, portrait_request
from facetron.contract import (CLIENT_NUM_IMAGES, CONTROL_CHOICES, DEFAULT_CONTROL_SCALE, DEFAULT_FUSION_STRENGTH,
                               DEFAULT_VAE, MAX_CACHE_INTERVAL, MAX_CONTROL_SCALE, SCHEDULERS, VAE_CHOICES)
from facetron.errors import FacetronError, InvalidInputError

# library argument -> CLI flag, so errors name what the user typed
FLAGS = {
    "user_id": "--user",
    "num_images": "--num-images",
    "top_k": "--top-k",
    "steps": "--steps",
    "guidance": "--guidance",
    "seed": "--seed",
    "height": "--height",
    "width": "--width",
    "template": "--template",
    "strength": "--strength",
    "fusion_strength": "--fusion-strength",
    "cache_interval": "--cache-interval",
    "paste_template": "--paste-template",
    "vae": "--vae",
    "control": "--control",
    "control_scale": "--control-scale",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate ranked portraits of a user (gRPC portrait call, failover over servers)",
        description="One portrait call over gRPC (round-robin + failover over --server). Writes the "
        "returned images best first (portrait_NN.png), grid.png (rank + similarity) and result.json into --out.",
    )
    p.add_argument("--user", required=True, help="registered user id")
    p.add_argument("--token-file", type=Path, default=None,
                   help="a file holding the user's token (default: the operator's token store, where "
                        "`facetron users token` keeps it)")
    p.add_argument("--style", default=None, help="style name (server's style registry)")
    p.add_argument("--prompt", default=None, help="prompt text (default: the style's / server's)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt text (default: the style's / server's)")
    p.add_argument("--num-images", type=int, default=CLIENT_NUM_IMAGES,
                   help="images generated in the call (the candidates ranked; --top-k of them are returned)")
    p.add_argument("--top-k", type=int, default=None, help="images to return and write (default: server's)")
    p.add_argument("--server", default=DEFAULT_URL, help="host:port[,host:port] of Triton gRPC endpoints")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=None, help="candidate i uses seed + i (default: server's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: server's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    sides = ("pixels: a multiple of the model's latent factor x its UNet's down factor (64 for SD-1.5, 16 for the "
             "tiny default; default: the model's)")
    p.add_argument("--height", type=int, default=None, help=sides)
    p.add_argument("--width", type=int, default=None, help=sides)
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="sampler (default: the server's)")
    p.add_argument("--template", type=Path, default=None, help="template photo (template mode)")
    p.add_argument("--paste-template", action="store_true",
                   help="template mode: put the template's own pixels back outside the face region after decoding "
                        "(FaceChain's crop-and-paste; default off: the decoded inpainting, as diffusers returns it)")
    p.add_argument("--strength", type=float, default=None, help="template mode: 0 < strength <= 1")
    p.add_argument("--fusion-strength", type=float, default=None,
                   help=f"blend of the user's best photo into each generated face, 0..1 (0 = no fusion; "
                        f"default: the server's, {DEFAULT_FUSION_STRENGTH:g})")
    p.add_argument("--cache-interval", type=int, default=None,
                   help=f"step caching: a full UNet every N steps, the cached deep features between (1..{MAX_CACHE_INTERVAL}; "
                        "1 = off, the server's default; faster, with a small deviation)")
    p.add_argument("--vae", choices=VAE_CHOICES, default=None,
                   help="the autoencoder that decodes: full (the base model's VAE) or tiny (AutoencoderTiny / "
                        "TAESD: faster, less fine detail; needs a repository assembled with `export repository "
                        f"--tiny-vae DIR`); default: the server's, {DEFAULT_VAE}")
    p.add_argument("--control", choices=CONTROL_CHOICES, default=None,
                   help="template mode: a ControlNet conditioned on the template (canny: its edges, made on the "
                        "server); needs --template and a repository assembled with `export repository --controlnet "
                        "DIR` (default: none)")
    p.add_argument("--control-scale", type=float, default=None,
                   help=f"the ControlNet's weight, 0..{MAX_CONTROL_SCALE:g} (0 = as without it; default: the "
                        f"server's, {DEFAULT_CONTROL_SCALE:g})")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per attempt")
    p.add_argument("--retries", type=int, default=3, help="rounds over the servers on UNAVAILABLE")
    p.add_argument("--stream", action="store_true",
                   help="stream per-step progress from the portrait_stream model (uses the first server, no "
                        "failover; shown as --progress says)")
    p.set_defaults(func=run)


def _token(args: argparse.Namespace) -> str | None:
    """--token-file's token; None = the client's default (the operator's token store)."""
    if args.token_file is None:
        return None
    try:
        return args.token_file.read_text().strip() or None
    except OSError as exc:
        raise InvalidInputError("--token-file", f"cannot read {args.token_file}: {exc.strerror}") from None


def _renamed(err: InvalidInputError) -> InvalidInputError:
    return InvalidInputError(FLAGS.get(err.input_name, err.input_name), err.rule)


def _request(args: argparse.Namespace, template: np.ndarray | None) -> dict[str, Any]:
    """The portrait keyword arguments, validated before any connection."""
    kwargs = dict(
        user_id=args.user,
        style=args.style,
        prompt=args.prompt,
        num_images=args.num_images,
        top_k=args.top_k,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        height=args.height,
        width=args.width,
        template=template,
        strength=args.strength,
        negative_prompt=args.negative_prompt,
        scheduler=args.scheduler,
        fusion_strength=args.fusion_strength,
        cache_interval=args.cache_interval,
        paste_template=args.paste_template or None,
        vae=args.vae,
        control=args.control,
        control_scale=args.control_scale,
    )
    try:
        portrait_request(**kwargs)
    except InvalidInputError as err:
        raise _renamed(err) from None
    return kwargs


def _make_out(out: Path, create: bool) -> None:
    """Check ``--out`` before the call; create it only once there is something to write."""
    if out.exists() and not out.is_dir():
        raise InvalidInputError("--out", f"{out} exists and is not a folder")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidInputError("--out", f"cannot create {out}: {exc.strerror or exc}") from None


def _streamed(server: str, kwargs: dict, timeout_s: float, token: str | None):
    """One call over a gRPC stream with a progress bar of denoising steps (first server only)."""
    from facetron.client import FacetronClient
    from facetron.progress import progress_bar

    bar = progress_bar(desc="denoising", unit="step", leave=False)

    def on_progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        with FacetronClient(server, timeout_s=timeout_s) as client:
            try:
                result = client.portrait(**kwargs, on_progress=on_progress, timeout_s=timeout_s, token=token)
            except InvalidInputError as err:
                raise _renamed(err) from None
    finally:
        bar.close()
    return result, [server]


def run(args: argparse.Namespace) -> int:
    from facetron.client.grid import draw_grid, similarity_labels
    from facetron.client.pool import ServerPool, parse_servers
    from facetron.atomic import atomic_write_json
    from facetron.imageio import load_image, save_image

    servers = parse_servers(args.server, "--server")
    if args.timeout <= 0:
        raise InvalidInputError("--timeout", f"must be > 0 seconds, got {args.timeout}")
    if args.retries < 1:
        raise InvalidInputError("--retries", f"must be >= 1, got {args.retries}")
    template = load_image(args.template, "--template") if args.template is not None else None
    kwargs = _request(args, template)
    _make_out(args.out, create=False)

    t0 = time.perf_counter()
    if args.stream:
        result, used = _streamed(servers[0], kwargs, args.timeout, _token(args))
    else:
        with ServerPool(servers, timeout_s=args.timeout, retry=RetryPolicy(attempts=args.retries)) as pool:
            try:
                result = pool.portrait(**kwargs, token=_token(args))
            except InvalidInputError as err:  # the server's rule: name the flag when it is one
                raise _renamed(err) from None
            used = pool.servers_used()
    total_s = time.perf_counter() - t0

    _make_out(args.out, create=True)
    files = []
    try:
        for pos, image in enumerate(result.images):
            name = f"portrait_{pos:02d}.png"
            save_image(args.out / name, np.ascontiguousarray(image))
            files.append(name)
        if len(result.images):
            generated = result.similarity_generated if result.similarity_generated is not None else result.similarity
            final = result.similarity_final if result.similarity_final is not None else result.similarity
            labels = similarity_labels(generated, final, result.rank, result.selected, result.ranked_by)
            grid = draw_grid(list(result.images), labels)
            save_image(args.out / "grid.png", grid)
        candidates = result.candidates()
        for row in candidates:
            row["file"] = files[row["position"]] if row["position"] is not None else None
        atomic_write_json(
            args.out / "result.json",
            {
                "user_id": args.user,
                "request": {k: v for k, v in kwargs.items() if k != "template" and v is not None}
                | ({"template": str(args.template)} if args.template else {}),
                "ranked_by": result.ranked_by,
                "seed": result.report.get("seed"),
                "candidates": candidates,
                "selected": [int(i) for i in result.selected],
                "files": files,
                "grid": "grid.png" if files else None,
                "report": result.report,
                "client": {**result.timing, "command_total_s": round(total_s, 4)},
                "servers": servers,
                "servers_used": used,
            },
        )
    except OSError as exc:
        raise FacetronError(f"writing {args.out}: {exc.strerror or exc}") from None

    best = next((c for c in candidates if c["rank"] == 0), None)
    scores = (f"best: generated {best['similarity_generated']}, final {best['similarity_final']}, "
              f"ranked by {result.ranked_by}" if best else "no candidate passed the face checks")
    print(
        f"wrote {len(files)} of {len(candidates)} portraits to {args.out} "
        f"({scores}; seed {result.report.get('seed')}; server {result.server}; "
        f"{result.timing['client_total_s']:.1f} s)"
    )
    if result.report.get("smoke_model"):
        print(f"note: {result.report.get('provenance', 'tiny smoke model: these pictures are not portraits')}")
    return 0
