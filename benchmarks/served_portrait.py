"""One portrait served end to end, as an operator deploys it: a base model folder
(random weights: the tiny spec, or SD-1.5 shapes with ``full``), a repository
assembled as ``facetron export repository`` does with its CLI defaults
(``--cpu-runtime auto --precision auto``: each net's runtime and precision
measured on this machine; the library called in a child process, not the
CLI), a real ``tritonserver``, and gRPC ``portrait`` calls
through facetron's client: one with the defaults, one with step caching
(``cache_interval`` 3). Every call: 1 image at the model's native size, the
default steps, ``fusion_strength`` 0 (random weights make no face, so no picture
passes the face filter: 0 images come back and the time is generation + ranking).

``fewstep`` (issue 23's served few-step path): the repository also serves a
random distillation LoRA merged into ``unet_fewstep`` (an SD-1.5 LCM-LoRA's
rank 64 over its layer kinds, ``export repository --distill-lora``) and a
random ``AutoencoderTiny`` of TAESD's shapes (``--tiny-vae``), and the calls
are LCM, 4 steps, guidance 1 (a batch-1 UNet per step) with the tiny and the
full VAE, besides today's default call. Random weights cost what real ones
do: the distillation LoRA is merged into the graph's weights.

Writes ``<date>-<machine>-served-portrait-<spec>[-fewstep].{json,md,png}``:
the runtime choice (and the UNet's bf16 image check where the CPU measured
one), assembly seconds, each call's wall seconds and the server's stage
timings. ``full`` needs the machine alone: ~10 minutes (more with
``fewstep``: a second UNet exported and measured).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from facetron import contract

USER = "bench-user"
CALLS = (("warmup_2_steps", {"steps": 2}), ("default", {}), ("cache_interval_3", {"cache_interval": 3}))
#: ``fewstep``: the served few-step path (contract.FEW_STEP_DEFAULT_STEPS at FEW_STEP_DEFAULT_GUIDANCE), warmed up
#: first, with the tiny autoencoder and with the full VAE; and today's default for the ratio in the same run
FEWSTEP = {"scheduler": "lcm", "steps": contract.FEW_STEP_DEFAULT_STEPS, "guidance": contract.FEW_STEP_DEFAULT_GUIDANCE}
FEWSTEP_CALLS = (("warmup_fewstep", dict(FEWSTEP, steps=1, vae="tiny")), ("warmup_2_steps", {"steps": 2}),
                 (f"fewstep_lcm_{FEWSTEP['steps']}_tiny_vae", dict(FEWSTEP, vae="tiny")),
                 (f"fewstep_lcm_{FEWSTEP['steps']}_full_vae", dict(FEWSTEP, vae="full")),
                 ("default", {}))
#: the random distillation LoRA: an SD-1.5 LCM-LoRA's rank (latent-consistency/lcm-lora-sdv1-5 is rank 64)
DISTILL_RANK = 64


def _user(registry, unet, work: Path) -> None:
    """A registered user with a random rank-4 face LoRA (FaceChain's rank) of the base ``unet`` and a random
    reference embedding."""
    from facetron.benchmarks.suite import grant_token
    from facetron.training.random_lora import write_random_lora

    lora = write_random_lora(work / "user.safetensors", unet, rank=4, alpha=32.0, seed=7, std=0.01)
    emb = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    registry.save_reference_embedding(USER, emb / np.linalg.norm(emb))
    registry.install_lora(USER, lora)
    grant_token(registry, USER)


def _fewstep_parts(unet, work: Path) -> dict:
    """A random distillation LoRA of the base ``unet`` (rank :data:`DISTILL_RANK` over an LCM-LoRA's layer kinds)
    and a random ``AutoencoderTiny`` of TAESD's shapes: ``{"distill_lora": file, "tiny_vae": folder}``."""
    from facetron.benchmarks.portrait_setup import TAESD_SHAPES
    from facetron.export.distill_lora import LCM_LORA_TARGET_MODULES
    from facetron.export.tiny_vae import write_random_tiny_vae
    from facetron.training.random_lora import write_random_lora

    distill = write_random_lora(work / "distill.safetensors", unet, rank=DISTILL_RANK, alpha=float(DISTILL_RANK),
                                seed=41, std=0.01, target_modules=LCM_LORA_TARGET_MODULES)
    tiny = write_random_tiny_vae(work / "taesd_random", **TAESD_SHAPES)
    return {"distill_lora": distill, "tiny_vae": tiny}


def _assemble_repository(base_dir: Path, repo: Path, users_dir: Path, log: Path, parts: dict | None = None) -> None:
    """What ``facetron export repository --base-model B --out R --users-dir U`` runs with its defaults
    (cpu target, runtime-LoRA identity, runtime-LoRA rank 16, ``--cpu-runtime auto --precision auto``, int8 off),
    with ``parts`` (:func:`_fewstep_parts`) as ``--distill-lora`` / ``--tiny-vae``; its printed output goes to
    ``log``."""
    from facetron.contract import IDENTITY_MODES
    from facetron.export.diffusion_source import DiffusionSource
    from facetron.export.repository import assemble_repository

    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        assemble_repository("cpu", repo, diffusion=DiffusionSource(base_model=base_dir, **(parts or {})),
                            users_dir=users_dir, identity_mode=IDENTITY_MODES[0], cpu_runtime="auto",
                            precision="auto", int8="off")


def run(full: bool = False, out_dir: Path | None = None, work_dir: Path | None = None, fewstep: bool = False) -> dict:
    """The benchmark (numbered steps below); returns the result written to ``out_dir``."""
    from facetron.benchmarks.runtimes import _loadavg, cpu_description
    from facetron.client import FacetronClient
    from facetron.diffusion.base_model import load_base_model, write_base_model
    from facetron.diffusion.model_spec import SD15, TINY
    from facetron.triton.server import TritonServer
    from facetron.users import UserRegistry

    spec = SD15 if full else TINY
    result: dict = {"spec": ("sd15" if full else "tiny") + ("-fewstep" if fewstep else ""), "cpu": cpu_description(),
                    "loadavg_start": _loadavg(), "stages_s": {}, "calls": [],
                    "note": "random weights: speed only; no face is generated, so no picture is returned"}
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="facetron-bench-served-") as tmp:
        work = Path(tmp)
        # 1. a base model folder and a registered user
        t0 = time.perf_counter()
        base = write_base_model(spec, work / "base")
        registry = UserRegistry(work / "users")
        unet = load_base_model(base).unet  # loaded once for the user's LoRA (and the distillation LoRA)
        _user(registry, unet, work)
        parts = _fewstep_parts(unet, work) if fewstep else None
        unet = None  # freed before the assembly's child process loads its own
        result["stages_s"]["base_and_user"] = round(time.perf_counter() - t0, 1)
        # 2. the repository, as the CLI assembles it by default (in a fresh child process: its memory goes when
        #    it ends, and it loads its libraries itself, as the CLI would; a failure is raised here)
        t0 = time.perf_counter()
        repo = work / "repo"
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            child.submit(_assemble_repository, base, repo, registry.root, work / "export_repository.log",
                         parts).result()
        result["stages_s"]["export_repository"] = round(time.perf_counter() - t0, 1)
        choice = json.loads((repo / "runtime_choice.json").read_text())
        result["runtime_choice"] = {
            "runtimes": choice["runtimes"], "precisions": choice["precisions"],
            "unet_bf16": choice["measurements"]["unet"]["runtimes"].get("openvino_bf16"),
            "reasons": {net: m["reason"] for net, m in choice["measurements"].items()},
            "reused": sorted(net for net, m in choice["measurements"].items() if m.get("reused"))}
        # 3. a real tritonserver and the gRPC calls
        server = TritonServer(repo, log_path=work / "tritonserver.log", env={"FACETRON_USERS_DIR": str(registry.root)})
        t0 = time.perf_counter()
        server.start()
        result["stages_s"]["server_start"] = round(time.perf_counter() - t0, 1)
        try:
            with FacetronClient(server.grpc_url, timeout_s=3600) as client:
                for name, kwargs in (FEWSTEP_CALLS if fewstep else CALLS):
                    t0 = time.perf_counter()
                    answer = client.portrait(USER, num_images=1, seed=11, fusion_strength=0.0, **kwargs)
                    result["calls"].append({"call": name, **kwargs, "wall_s": round(time.perf_counter() - t0, 2),
                                            "images_returned": int(len(answer.images)),
                                            "unet": answer.report.get("unet"), "vae": answer.report.get("vae"),
                                            "server_timings_ms": answer.report.get("timings_ms")})
                    print(f"[bench served] {name}: {result['calls'][-1]['wall_s']} s", flush=True)
        finally:
            server.stop()
    result["loadavg_end"] = _loadavg()
    if fewstep:
        result["fewstep_speedup"] = fewstep_speedup(result["calls"])
    return _write(result, out_dir)


def _write(result: dict, out_dir: Path | None) -> dict:
    from facetron.benchmarks.report import markdown_table, write_result

    choice = result["runtime_choice"]
    md = (f"One portrait (1 image, native size, default steps, fusion off) of a registered user served end to end, "
          f"spec `{result['spec']}` ({result['note']}): repository assembled by `facetron export repository` with "
          f"its defaults (`--cpu-runtime auto --precision auto`), a real tritonserver, gRPC `portrait` calls.\n\n"
          f"CPU: {result['cpu']['model']}; flags {', '.join(result['cpu']['kernel_flags'])}\n\n"
          f"Chosen per net: " + ", ".join(f"{k} {v} {choice['precisions'][k]}" for k, v in choice["runtimes"].items())
          + f"; UNet bf16 check: {json.dumps((choice.get('unet_bf16') or {}).get('image_check'))}; kept choices "
          f"reused (not measured again): {', '.join(choice.get('reused') or []) or 'none'}\n\n"
          + markdown_table([{"call": c["call"], "wall s": c["wall_s"], "images returned": c["images_returned"],
                             "server generate ms": (c["server_timings_ms"] or {}).get("generate_ms")}
                            for c in result["calls"]], ["call", "wall s", "images returned", "server generate ms"])
          + _fewstep_line(result)
          + f"\nstages (s): {result['stages_s']}; load average {result['loadavg_start']} -> {result['loadavg_end']}\n")
    path = write_result(f"served-portrait-{result['spec']}", result, md, out_dir=out_dir)
    result["files"] = [str(path), str(path.with_suffix(".md")), str(_plot(result, path.with_suffix(".png")))]
    return result


def fewstep_speedup(calls: list[dict]) -> dict[str, float]:
    """Each few-step call's speed-up over the default call of the same run ({} without them)."""
    wall = {c["call"]: c["wall_s"] for c in calls}
    if "default" not in wall:
        return {}
    return {k: round(wall["default"] / wall[k], 2) for k in wall if k.startswith("fewstep_")}


def _fewstep_line(result: dict) -> str:
    """The markdown line of :func:`fewstep_speedup` (empty without few-step calls)."""
    speedup = result.get("fewstep_speedup")
    if not speedup:
        return ""
    wall = {c["call"]: c["wall_s"] for c in result["calls"]}
    return (f"\nfew-step calls vs the default call ({wall['default']} s): "
            + ", ".join(f"{k} {wall[k]} s (x{v})" for k, v in speedup.items()) + "\n")


def _plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [c for c in result["calls"] if not c["call"].startswith("warmup")]
    fig, ax = plt.subplots(figsize=(7, 2.6))
    ax.barh([c["call"] for c in rows], [c["wall_s"] for c in rows], color="#4477aa")
    for i, c in enumerate(rows):
        ax.text(c["wall_s"], i, f" {c['wall_s']:.1f} s", va="center")
    choice = result["runtime_choice"]
    ax.set_xlabel("seconds per gRPC portrait call")
    ax.set_title(f"served portrait ({result['spec']}): " + ", ".join(
        f"{k}={v}/{choice['precisions'][k]}" for k, v in choice["runtimes"].items()), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
