"""``facetron demo``: the README's main job, end to end on the embedded default.

photos (from installed packages) -> prepare (detect, filter, align, caption)
-> train the identity LoRA on the tiny default model -> export ONNX + assemble
the Triton repository -> start tritonserver on 127.0.0.1 -> ``portrait``
calls over gRPC in template mode -> ranked portraits, a grid PNG and a
report in ``$FACETRON_HOME/outputs/demo/`` (``make demo``: ``outputs/demo/``) -> server stopped.

The tiny default generator has random weights: its own pixels are not
portraits and hold no face. Template mode on real template photos shows
what facetron does: the template's face region is generated, the generated
faces are ranked (none on the tiny model: the server then ranks by the
fused pictures and says so), and the user's best photo is blended into each
face at ``--fusion-strength`` (1.0 by default on the tiny model: a face
blended at 0.5 into its noise is no face the detector finds again, and the
returned pictures are scored from a fresh detection). The grid shows both similarities under each
picture (the generated face's and the returned picture's; ``*`` marks the
one that ranked); ``report.json`` says which parts came from the tiny
model. With ``--base-model`` pointing at a real SD-1.5 folder the same
command makes real portraits.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from facetron import __version__
from facetron.atomic import atomic_write_json
from facetron.imageio import save_image
from facetron.cli.options import add_runtime_precision, under_data_root

DEMO_USER = "astronaut"


class StageTimer:
    """Collects wall-clock seconds per named stage."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        print(f"[demo] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = round(time.perf_counter() - t0, 2)
            print(f"[demo] {name}: {self.stages[name]:.1f} s", flush=True)


#: the demo's fusion strength on the tiny smoke model (its generated face region is noise; measured on three t1
#: templates with a noise-filled face region: at 0.5 the fused face was found again in none, at 0.7-1.0 in 2 of 3,
#: similarity 0.90-0.95; a real base model keeps the server's default)
SMOKE_FUSION_STRENGTH = 1.0

def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job end to end (photos -> LoRA -> Triton -> ranked portraits)")
    p.add_argument("--out", type=Path, default=under_data_root("outputs", "demo"),
                   help="output folder (portraits, grid, report)")
    p.add_argument("--build", type=Path, default=under_data_root("demo"),
                   help="work folder (prepared data, LoRA, users, model repository)")
    p.add_argument("--photos", type=Path, default=None,
                   help="folder of photos of one person (default: the shipped demo set)")
    p.add_argument("--user", default=DEMO_USER, help="user id the photos are registered and trained as")
    p.add_argument("--attr", action="append", default=None, help="caption attribute (default: gender=woman)")
    p.add_argument("--base-model", type=Path, default=None, help="SD-1.5-layout folder (default: tiny embedded)")
    p.add_argument("--train-steps", type=int, default=300,
                   help="LoRA training steps (FaceChain: min(200 x photos, 800))")
    p.add_argument("--templates", type=int, default=3, help="template photos to use")
    p.add_argument("--num-images", type=int, default=4,
                   help="images generated per template (each portrait call's candidates)")
    p.add_argument("--top-k", type=int, default=2, help="images returned per template (the best by face similarity)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    add_runtime_precision(p, "runtime of the nets, as `export repository --cpu-runtime`",
                          "precision of the nets, as `export repository --precision`", default="auto")
    p.add_argument("--size", type=int, default=256, help="portrait side in px")
    p.add_argument("--fusion-strength", type=float, default=None,
                   help="blend of the user's best photo into each face, 0..1 (default: the server's 0.5 with "
                        "--base-model; 1.0 on the tiny smoke model, whose generated face region is noise: only a "
                        "full-strength blend leaves a face the detector finds again in the returned picture)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from facetron.client import FacetronClient
    from facetron.client.grid import draw_grid, similarity_labels
    from facetron.contract import PORTRAIT_OUTPUTS, USER_TOKEN_HEADER, check_fusion_strength
    from facetron.export.diffusion_source import DiffusionSource
    from facetron.export.repository import assemble_repository
    from facetron.faces.attributes import UserAttributes, parse_attr_flags
    from facetron.faces.detector import FaceDetector
    from facetron.training.demo_photos import make_demo_photos
    from facetron.training.demo_templates import TEMPLATE_SOURCE, demo_templates
    from facetron.training.lora_config import LoraTrainConfig
    from facetron.training.preprocess import PrepareConfig, prepare_photos, register_user
    from facetron.training.train_lora import train_lora
    from facetron.triton.server import TritonServer
    from facetron.token_store import TokenStore
    from facetron.users import UserRegistry, validate_user_id

    user = validate_user_id(args.user, "--user")
    if args.fusion_strength is not None:
        check_fusion_strength(args.fusion_strength, "--fusion-strength")
    out, build = args.out, args.build
    out.mkdir(parents=True, exist_ok=True)
    build.mkdir(parents=True, exist_ok=True)
    registry = UserRegistry(build / "users")
    timer = StageTimer()
    t_all = time.perf_counter()
    report: dict = {
        "facetron_version": __version__,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "user": user,
    }

    with timer.stage("photos"):
        photos = args.photos or make_demo_photos(build / "photos")
    with timer.stage("prepare"):
        from facetron.diffusion.base_model import ensure_tiny_model, load_base_model

        base_path = args.base_model or ensure_tiny_model()
        resolution = load_base_model(base_path).resolution
        attrs = UserAttributes(parse_attr_flags(args.attr or ["gender=woman"]))
        prepared = prepare_photos(photos, build / "prepared", PrepareConfig(resolution=resolution), attrs, progress=True)
        register_user(registry, user, prepared)
        token = registry.issue_token(user)  # a fresh one each run: the portrait calls below act as the user
        TokenStore().put(user, token)
        shutil.copyfile(build / "prepared" / "contact_sheet.png", out / "contact_sheet.png")
        report["prepare"] = {
            "photos": str(photos),
            "kept": [p.file for p in prepared.kept],
            "dropped": {p.file: p.reason for p in prepared.photos if not p.kept},
        }
    with timer.stage("train_lora"):
        lora_dir = build / "loras"
        shutil.rmtree(lora_dir, ignore_errors=True)  # a fresh run, not a resume
        result = train_lora(prepared.dataset_dir, lora_dir, user_id=user, base_model=base_path,
                            config=LoraTrainConfig(steps=args.train_steps), progress=True)
        registry.install_lora(user, result.lora_path, result.metadata_path)
        report["train"] = {"steps": result.steps, "loss": result.metadata["loss"], "lora": str(result.lora_path)}
    with timer.stage("export_repository"):
        repo = assemble_repository("cpu", build / "model_repository",
                                   diffusion=DiffusionSource(base_model=args.base_model), users_dir=registry.root,
                                   cpu_runtime=args.cpu_runtime, precision=args.precision)
    with timer.stage("start_triton"):
        server = TritonServer(repo, log_path=out / "tritonserver.log").start()
    calls = []
    returned: list[tuple[np.ndarray, str]] = []  # (picture, grid label)
    try:
        templates = demo_templates(FaceDetector(), size=args.size, count=args.templates)
        with timer.stage("portraits_grpc"), FacetronClient(server.grpc_url, timeout_s=1800) as client:
            for n, (name, template) in enumerate(templates):
                t0 = time.perf_counter()
                inputs = {
                    "user_id": np.array([user.encode()], dtype=object),
                    "template": template,
                    "num_images": np.array([args.num_images], np.int32),
                    "top_k": np.array([args.top_k], np.int32),
                    "steps": np.array([args.steps], np.int32),
                    "seed": np.array([1000 * n], np.int64),
                    "height": np.array([args.size], np.int32),
                    "width": np.array([args.size], np.int32),
                }
                strength = args.fusion_strength if args.fusion_strength is not None else (
                    SMOKE_FUSION_STRENGTH if args.base_model is None else None)
                if strength is not None:
                    inputs["fusion_strength"] = np.array([strength], np.float32)
                if args.base_model is None:  # the tiny model's random VAE turns the template into noise:
                    inputs["paste_template"] = np.array([True])  # keep the template's pixels outside the face
                res = client.infer("portrait", inputs, list(PORTRAIT_OUTPUTS), headers={USER_TOKEN_HEADER: token})
                server_report = json.loads(res["report"][0])
                save_image(out / "templates" / f"{name}.png", template)
                labels = similarity_labels(res["similarity_generated"], res["similarity_final"], res["rank"],
                                           res["selected"], server_report["ranked_by"], [name] * len(res["selected"]))
                for r, label in enumerate(labels):
                    path = out / "portraits" / f"{name}_rank{r}.png"
                    save_image(path, res["images"][r])
                    returned.append((res["images"][r], label))

                def rounded(values: np.ndarray) -> list:
                    return [None if np.isnan(v) else round(float(v), 4) for v in values]

                calls.append({
                    "template": name,
                    "seconds": round(time.perf_counter() - t0, 2),
                    "ranked_by": server_report["ranked_by"],
                    "similarity": rounded(res["similarity"]),
                    "similarity_generated": rounded(res["similarity_generated"]),
                    "similarity_final": rounded(res["similarity_final"]),
                    "rank": res["rank"].tolist(),
                    "selected": res["selected"].tolist(),
                    "server": server_report,
                })
    finally:
        with timer.stage("stop_triton"):
            server.stop()
    if returned:
        grid = draw_grid([r[0] for r in returned], [r[1] for r in returned], cols=args.top_k * 2, cell=args.size)
        save_image(out / "grid.png", grid)
    report["portraits"] = calls
    report["templates"] = TEMPLATE_SOURCE
    report["server_log"] = str(out / "tritonserver.log")
    report["smoke_model"] = bool(calls and calls[0]["server"].get("smoke_model"))
    report["note"] = (calls[0]["server"]["provenance"] if calls else "no portrait calls made")
    report["timings_s"] = dict(timer.stages, total=round(time.perf_counter() - t_all, 1))
    path = atomic_write_json(out / "report.json", report)
    print(f"[demo] {len(returned)} portraits in {out / 'portraits'}; grid {out / 'grid.png'}; report {path}")
    if report["smoke_model"]:
        print("[demo] note: tiny smoke model — its pixels are not portraits and hold no face; the faces you see are "
              "the user's best photo blended into the template's face region (see report.json)")
    return 0
