"""Face-path benchmark (side by side in one run):

* embedder per face: ONNX Runtime (batch 1 and 16) vs torch eager vs dlib-bin,
  plus same/different verdict agreement under dlib's 0.6 rule;
* detect + align + embed throughput on 512² photos, in-process;
* Triton (gRPC, real server) vs in-process for face_detector and face_select.

Run: ``facetron bench faces`` (writes benchmarks/results/<date>-<machine>-faces.{json,md,png}).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np

from facetron.assets import asset_path
from facetron.faces.crop import square_crop
from facetron.benchmarks.report import markdown_table, write_result
from facetron.benchmarks.timing import interleaved, summarize
from facetron.imageio import load_image


def _real_faces(detector):
    """Photos and detections of every real face available (+ flipped copies)."""
    images = [load_image(asset_path(n)) for n in ("photo_t1", "photo_tom_hanks", "photo_astronaut")]
    images += [img[:, ::-1].copy() for img in images[1:]]
    return [(img, detector.detect(img)) for img in images]


def _square_512(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    return square_crop(image, box, 512, 3.0, border_value=128, interpolation=cv2.INTER_AREA)


def bench_embedder(detector, embedder, repeats: int) -> dict:
    import dlib

    from facetron.faces.alignment import align_faces
    from facetron.faces.embedder import FaceEmbedder

    faces = _real_faces(detector)
    chips = np.concatenate([align_faces(img, det.landmarks) for img, det in faces])
    dlib_net = dlib.face_recognition_model_v1(str(asset_path("dlib_resnet")))
    torch_embedder = FaceEmbedder(backend="torch")
    one = chips[:1]
    batch = np.resize(chips, (16,) + chips.shape[1:])
    samples = interleaved(
        {
            "dlib_bin": lambda: dlib_net.compute_face_descriptor(one[0]),
            "onnx_batch1": lambda: embedder.descriptors(one),
            "onnx_batch16": lambda: embedder.descriptors(batch),
            "torch_batch1": lambda: torch_embedder.descriptors(one),
        },
        repeats,
    )
    per_face = {k: summarize(v / (16 if k.endswith("16") else 1)) for k, v in samples.items()}
    ours = embedder.descriptors(chips)
    ref = np.stack([np.asarray(dlib_net.compute_face_descriptor(c)) for c in chips]).astype(np.float32)
    pairs = list(itertools.combinations(range(len(chips)), 2))
    agree = sum(
        (np.linalg.norm(ours[i] - ours[j]) < 0.6) == (np.linalg.norm(ref[i] - ref[j]) < 0.6) for i, j in pairs
    )
    return {
        "faces": int(len(chips)),
        "per_face": per_face,
        "speedup_onnx_batch1_vs_dlib": round(per_face["dlib_bin"]["p50_ms"] / per_face["onnx_batch1"]["p50_ms"], 2),
        "speedup_onnx_batch16_vs_dlib": round(per_face["dlib_bin"]["p50_ms"] / per_face["onnx_batch16"]["p50_ms"], 2),
        "max_abs_diff_vs_dlib": float(np.abs(ours - ref).max()),
        "verdict_pairs": len(pairs),
        "verdicts_identical": int(agree),
    }


def bench_pipeline(detector, embedder, repeats: int) -> dict:
    from facetron.faces.alignment import align_faces

    photos = [_square_512(img, b) for img, det in _real_faces(detector) for b in det.boxes]

    def run_all() -> None:
        for img in photos:
            det = detector.detect(img)
            if len(det):
                embedder.embed(align_faces(img, det.landmarks[:1]))

    secs = interleaved({"photos": run_all}, repeats)["photos"]
    per_photo = secs / len(photos)
    return {"photos": len(photos), "size": 512, "per_photo": summarize(per_photo),
            "photos_per_s": round(1.0 / float(np.median(per_photo)), 2)}


def bench_triton(detector, embedder, repeats: int) -> dict:
    from facetron.client import FacetronClient
    from facetron.faces.alignment import align_faces
    from facetron.pipeline.net_io import pack_detections
    from facetron.pipeline.selection import select_portraits
    from facetron.triton.server import TritonServer

    faces = _real_faces(detector)
    cands = np.stack([_square_512(img, b)[::2, ::2].copy() for img, det in faces for b in det.boxes][:8])
    tom = faces[1]
    ref = embedder.embed(align_faces(tom[0], tom[1].landmarks[:1]))
    photo = cands[0][None]
    import tempfile

    from facetron.export.repository import assemble_repository

    repo = assemble_repository("cpu", Path(tempfile.mkdtemp(prefix="facetron-bench-")) / "model_repository")
    with TritonServer(repo) as server, FacetronClient(server.grpc_url) as client:
        samples = interleaved(
            {
                "detector_triton": lambda: client.infer("face_detector", {"images": photo}, ["num_faces"]),
                "detector_inprocess": lambda: pack_detections(detector.detect_batch(list(photo))),
                "select8_triton": lambda: client.infer(
                    "face_select", {"images": cands, "reference_embedding": ref}, ["rank"]
                ),
                "select8_inprocess": lambda: select_portraits(
                    cands, ref, 0, lambda x: pack_detections(detector.detect_batch(list(x))), embedder.embed
                ),
            },
            repeats,
        )
    stats = {k: summarize(v) for k, v in samples.items()}
    return {
        "calls": stats,
        "detector_overhead_ms": round(stats["detector_triton"]["p50_ms"] - stats["detector_inprocess"]["p50_ms"], 2),
        "select8_overhead_ms": round(stats["select8_triton"]["p50_ms"] - stats["select8_inprocess"]["p50_ms"], 2),
        "image_size": list(cands.shape[1:3]),
    }


def _plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    emb = result["embedder"]["per_face"]
    axes[0].bar(list(emb), [v["p50_ms"] for v in emb.values()], color=["#999", "#2a7", "#2a7", "#c72"])
    axes[0].set_ylabel("ms per face (p50)")
    axes[0].set_title("face embedder: ONNX Runtime vs torch vs dlib-bin")
    axes[0].set_yscale("log")
    calls = result["triton"]["calls"]
    axes[1].bar(list(calls), [v["p50_ms"] for v in calls.values()], color=["#36c", "#2a7", "#36c", "#2a7"])
    axes[1].set_ylabel("ms per call (p50)")
    axes[1].set_title("Triton gRPC vs in-process")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    from io import BytesIO

    from facetron.atomic import atomic_write_bytes

    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    plt.close(fig)


def run(repeats: int = 20) -> dict:
    from facetron.faces.detector import FaceDetector
    from facetron.faces.embedder import FaceEmbedder

    detector, embedder = FaceDetector(), FaceEmbedder()
    result = {
        "embedder": bench_embedder(detector, embedder, repeats),
        "pipeline": bench_pipeline(detector, embedder, max(3, repeats // 5)),
        "triton": bench_triton(detector, embedder, repeats),
    }
    e, p, t = result["embedder"], result["pipeline"], result["triton"]
    rows = [
        {"measure": "embedder ONNX b1 vs dlib-bin (per face)", "value": f"{e['speedup_onnx_batch1_vs_dlib']}x faster"},
        {"measure": "embedder ONNX b16 vs dlib-bin (per face)", "value": f"{e['speedup_onnx_batch16_vs_dlib']}x faster"},
        {"measure": "verdicts identical (0.6 rule)", "value": f"{e['verdicts_identical']}/{e['verdict_pairs']}"},
        {"measure": "max |ours - dlib| descriptor", "value": f"{e['max_abs_diff_vs_dlib']:.2e}"},
        {"measure": "detect+align+embed, 512² photos", "value": f"{p['photos_per_s']} photos/s"},
        {"measure": "face_detector Triton overhead (p50)", "value": f"{t['detector_overhead_ms']} ms"},
        {"measure": "face_select (8 cand.) Triton overhead (p50)", "value": f"{t['select8_overhead_ms']} ms"},
    ]
    md = markdown_table(rows, ["measure", "value"])
    md += "\n## per-face embedder latency\n\n" + markdown_table(
        [{"backend": k, **v} for k, v in e["per_face"].items()], ["backend", "p50_ms", "p90_ms", "mean_ms", "n"]
    )
    md += "\n## Triton vs in-process calls\n\n" + markdown_table(
        [{"call": k, **v} for k, v in t["calls"].items()], ["call", "p50_ms", "p90_ms", "mean_ms", "n"]
    )
    path = write_result("faces", result, md)
    _plot(result, path.with_suffix(".png"))
    result["written"] = str(path)
    return result
