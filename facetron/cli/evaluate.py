"""``facetron evaluate --user ID``: the identity report of a user's portraits.

Renders a fixed prompt x style set through running Triton servers and
reports the pre-fusion face similarity to the user's reference embedding
(mean, p10, share with exactly one face) as JSON + Markdown + a PNG grid
(:mod:`facetron.benchmarks.identity`). With real SD-1.5 weights::

    facetron export repository --target cpu --base-model /models/sd15 --out build/model_repository
    facetron serve --repo build/model_repository --grpc-port 8001 &
    facetron evaluate --user alice --server 127.0.0.1:8001 --size 512 --steps 25 --out outputs/alice-identity

Without ``--out`` the report goes to ``$FACETRON_HOME/outputs/evaluate/<user>``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from facetron.cli.options import under_data_root
from facetron.paths import HOME_SHOWN


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="identity report: pre-fusion face similarity of a user's generated portraits (JSON, Markdown, PNG)",
        description="Render a fixed prompt x style set for --user through the server (portrait_generator, no "
                    "fusion), score every picture against the user's reference embedding (face_select) and write "
                    "identity_report.json / .md / .png: mean, p10 and the share of pictures with exactly one face.",
    )
    p.add_argument("--user", required=True, help="registered user id")
    p.add_argument("--server", default="127.0.0.1:8001", help="host:port of a Triton gRPC endpoint")
    p.add_argument("--styles", default=None, help="comma-separated styles (default: the report's fixed set)")
    p.add_argument("--images-per-prompt", type=int, default=2,
                   help="pictures per prompt and style (seeds seed .. seed + N - 1)")
    p.add_argument("--seed", type=int, default=None, help="picture i uses seed + i (default: the report's fixed seed)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the server's)")
    p.add_argument("--size", type=int, default=None, help="picture side in px (default: the base model's)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: {HOME_SHOWN}/outputs/evaluate/<user>)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per call (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from facetron.benchmarks.identity import EVAL_SEED, EVAL_STYLES, EvalSettings, evaluate_identity, write_identity_report
    from facetron.client import FacetronClient
    from facetron.client.pool import parse_servers
    from facetron.contract import validate_user_id
    from facetron.errors import InvalidInputError

    user = validate_user_id(args.user, "--user")
    server = parse_servers(args.server, "--server")[0]
    styles = EVAL_STYLES if args.styles is None else tuple(s.strip() for s in args.styles.split(",") if s.strip())
    seed = EVAL_SEED if args.seed is None else args.seed
    flags = {"num_images": "--images-per-prompt", "--num": "--images-per-prompt", "height": "--size",
             "width": "--size", "style": "--styles"}  # library names -> the flags the user typed
    try:
        settings = EvalSettings(styles=styles, num=args.images_per_prompt, seed=seed, steps=args.steps,
                                size=args.size).check()
    except InvalidInputError as err:
        raise InvalidInputError(flags.get(err.input_name, err.input_name), err.rule) from None
    out = args.out or under_data_root("outputs", "evaluate", user)
    if out.exists() and not out.is_dir():
        raise InvalidInputError("--out", f"{out} exists and is not a folder")
    with FacetronClient(server, timeout_s=args.timeout) as client:
        try:
            report, pictures = evaluate_identity(client, user, settings)
        except InvalidInputError as err:  # name the flag where the library names its argument
            raise InvalidInputError(flags.get(err.input_name, err.input_name), err.rule) from None
    report["server"] = server
    paths = write_identity_report(report, pictures, out)
    o = report["overall"]
    print(f"identity of {user!r}: {o['one_face']}/{o['samples']} pictures with one face; "
          f"mean {o['mean'] if o['mean'] is not None else '-'}, p10 {o['p10'] if o['p10'] is not None else '-'}")
    print(f"note: {report['note']}")
    print(f"wrote {paths['json']}, {paths['markdown']}" + (f", {paths['grid']}" if "grid" in paths else ""))
    return 0
