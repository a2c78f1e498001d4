"""MTCNN face detector: nets, ONNX export and the numpy cascade.

References: facenet-pytorch's own modules and ``MTCNN.detect`` (the source of
the weights), and dlib's HOG face detector. facenet-pytorch imports
torchvision, which is not installed here; the ``facenet`` fixture stands in a
minimal pure-torch ``torchvision`` for this test module only and removes it
afterwards.
"""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import dlib
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from facetron.assets import asset_path
from facetron.errors import InvalidInputError
from facetron.faces import detector as detector_mod
from facetron.faces.detector import DetectorConfig, FaceDetector, mtcnn_onnx_paths
from facetron.faces.mtcnn_cascade import (
    CascadeParams,
    area_crops,
    area_resize,
    integral_image,
    nms,
    run_cascade,
)
from facetron.faces.mtcnn_nets import load_mtcnn_nets
from facetron.imageio import load_image

PHOTOS = ("photo_t1", "photo_tom_hanks", "photo_astronaut")


# ----------------------------------------------------------------------------- reference


def _torchvision_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> torch.Tensor:
    """TEST-ONLY stand-in for torchvision.ops.nms, faithful to its CPU kernel:
    stable descending sort, IoU without +1 in the boxes' dtype, drop IoU > thr."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    order = torch.sort(scores, stable=True, descending=True)[1]
    suppressed = torch.zeros(len(scores), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        suppressed |= inter / (areas[i] + areas - inter) > thr
    return torch.tensor(keep, dtype=torch.long)


def _torchvision_batched_nms(boxes, scores, idxs, thr):
    """TEST-ONLY: torchvision.ops.batched_nms (its coordinate-offset strategy)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return _torchvision_nms(boxes + offsets[:, None], scores, thr)


@pytest.fixture(scope="module")
def facenet():
    """facenet_pytorch.models.mtcnn, imported with a fake torchvision (removed afterwards)."""
    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")  # only used by extract_face
    boxes.batched_nms = ops.batched_nms = _torchvision_batched_nms
    ops.boxes, tv.ops, transforms.functional, tv.transforms = boxes, ops, functional, transforms
    fakes = {
        "torchvision": tv,
        "torchvision.ops": ops,
        "torchvision.ops.boxes": boxes,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
    }
    before = set(sys.modules)
    assert "torchvision" not in sys.modules
    sys.modules.update(fakes)
    try:
        import facenet_pytorch.models.mtcnn as mtcnn

        yield mtcnn
    finally:
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("torchvision", "facenet_pytorch"):
                del sys.modules[name]


@pytest.fixture(scope="module")
def ref_nets(facenet):
    return facenet.PNet().eval(), facenet.RNet().eval(), facenet.ONet().eval()


@pytest.fixture(scope="module")
def ours():
    return load_mtcnn_nets()


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: load_image(asset_path(name)) for name in PHOTOS}


@pytest.fixture(scope="module")
def onnx_paths(tmp_path_factory):
    """ONNX files exported through the detector's cache logic into a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("cache")
        mp.setenv("FACETRON_CACHE", str(cache))
        paths = mtcnn_onnx_paths()
        # second call finds the files (no re-export)
        mtimes = {k: p.stat().st_mtime_ns for k, p in paths.items()}
        again = mtcnn_onnx_paths()
        assert {k: p.stat().st_mtime_ns for k, p in again.items()} == mtimes
        det = FaceDetector(DetectorConfig(min_score=0.0), backend="onnx")
        det._runners()  # sessions opened while FACETRON_CACHE points at the temp cache
        yield paths, cache, det


@pytest.fixture(scope="module")
def det_onnx(onnx_paths) -> FaceDetector:
    return onnx_paths[2]


@pytest.fixture(scope="module")
def det_torch() -> FaceDetector:
    return FaceDetector(DetectorConfig(min_score=0.0), backend="torch")


def _real_inputs(photos) -> dict[str, torch.Tensor]:
    """Normalised real pixels: a pyramid level of t1 and face-sized crops."""
    img = photos["photo_t1"]
    integral = integral_image(img)
    windows = np.array([[150, 272, 268, 375], [262, 397, 54, 165], [0, 886, 0, 1280], [300, 320, 700, 710]])
    return {
        "pnet": torch.from_numpy(area_resize(integral, 200, 289)[None]),
        "rnet": torch.from_numpy(area_crops(integral, windows, 24)),
        "onet": torch.from_numpy(area_crops(integral, windows, 48)),
    }


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


# ----------------------------------------------------------------------------- nets


def test_runtime_never_imports_facenet_or_torchvision():
    root = Path(detector_mod.__file__).parent
    for name in ("detector.py", "mtcnn_nets.py", "mtcnn_cascade.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            for mod in mods:
                assert mod.split(".")[0] not in ("torchvision", "facenet_pytorch", "dlib"), (name, mod)


def test_state_dicts_load_with_same_names(ours, ref_nets):
    for mine, ref in zip(ours, ref_nets):
        assert list(mine.state_dict()) == list(ref.state_dict())
        assert not mine.training


@pytest.mark.parametrize("kind", ["random", "real"])
def test_nets_match_facenet_pytorch(kind, ours, ref_nets, photos):
    g = torch.Generator().manual_seed(0)
    if kind == "random":
        inputs = {
            "pnet": torch.rand(2, 3, 61, 47, generator=g) * 2 - 1,
            "rnet": torch.rand(7, 3, 24, 24, generator=g) * 2 - 1,
            "onet": torch.rand(7, 3, 48, 48, generator=g) * 2 - 1,
        }
    else:
        inputs = _real_inputs(photos)
    with torch.no_grad():
        for name, mine, ref in zip(("pnet", "rnet", "onet"), ours, ref_nets):
            a, b = mine(inputs[name]), ref(inputs[name])
            assert len(a) == len(b)
            for x, y in zip(a, b):
                assert x.shape == y.shape
                assert (x - y).abs().max().item() <= 1e-5, name


def test_onnx_files_and_names(onnx_paths):
    paths, cache, _ = onnx_paths
    assert set(paths) == {"pnet", "rnet", "onet"}
    digest = detector_mod.weights_digest()[:12]
    for name, path in paths.items():
        assert path == cache / "onnx" / f"mtcnn-{digest}" / f"{name}.onnx"
        model = onnx.load(str(path))
        assert [i.name for i in model.graph.input] == ["images"]
        dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert isinstance(dims[0], str) and dims[1] == 3
        if name == "pnet":
            assert all(isinstance(d, str) for d in (dims[2], dims[3]))
        outs = [o.name for o in model.graph.output]
        assert outs == (["offsets", "landmarks", "probs"] if name == "onet" else ["offsets", "probs"])
    assert not list((cache / "onnx" / f"mtcnn-{digest}").glob("*.tmp"))


def test_onnx_matches_torch_dynamic_shapes(onnx_paths, ours, photos):
    paths, _, _ = onnx_paths
    g = torch.Generator().manual_seed(1)
    real = _real_inputs(photos)
    cases = {
        "pnet": [torch.rand(1, 3, 40, 56, generator=g) * 2 - 1, real["pnet"]],
        "rnet": [real["rnet"][:1], torch.rand(7, 3, 24, 24, generator=g) * 2 - 1],
        "onet": [real["onet"][:1], torch.rand(7, 3, 48, 48, generator=g) * 2 - 1],
    }
    for (name, path), net in zip(paths.items(), ours):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for x in cases[name]:
            with torch.no_grad():
                want = [t.numpy() for t in net(x)]
            got = sess.run(None, {"images": x.numpy()})
            for w, o in zip(want, got):
                assert w.shape == o.shape
                assert np.abs(w - o).max() <= 1e-5, name


# ----------------------------------------------------------------------------- cascade


def test_area_resampling_is_torch_area_interpolation(photos):
    img = photos["photo_astronaut"]
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float()
    integral = integral_image(img)
    want = (torch.nn.functional.interpolate(x, size=(173, 231), mode="area") - 127.5) * 0.0078125
    assert np.array_equal(area_resize(integral, 173, 231), want[0].numpy())
    windows = np.array([[10, 100, 20, 70], [0, 7, 500, 512], [300, 512, 0, 212]])
    crops = area_crops(integral, windows, 24)
    for crop, (y0, y1, x0, x1) in zip(crops, windows):
        ref = torch.nn.functional.interpolate(x[:, :, y0:y1, x0:x1], size=(24, 24), mode="area")
        assert np.array_equal(crop, ((ref - 127.5) * 0.0078125)[0].numpy())


def test_nms_matches_greedy_reference():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (1500, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(8, 40, (1500, 2)).astype(np.float32)], axis=1)
    scores = rng.random(1500).astype(np.float32)
    want = _torchvision_nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).numpy()
    assert np.array_equal(nms(boxes, scores, 0.5), want)  # crosses the 1024-box chunk boundary
    groups = rng.integers(0, 3, 1500)
    got = nms(boxes, scores, 0.3, groups=groups)
    want = _torchvision_batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups), 0.3
    ).numpy()
    assert set(got.tolist()) == set(want.tolist())
    assert len(nms(boxes[:0], scores[:0], 0.5)) == 0


@pytest.fixture(scope="module")
def facenet_detections(facenet, photos):
    ref = facenet.MTCNN(keep_all=True, select_largest=False)
    return {name: ref.detect(img, landmarks=True) for name, img in photos.items()}


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_detector_matches_facenet_mtcnn(backend, facenet_detections, photos, det_torch, det_onnx):
    """Same faces as facenet-pytorch's MTCNN.detect (min_score=0 = its exact output).

    Measured here: boxes and landmarks within 6.1e-5 px, scores within 1.8e-7
    (8 faces on t1, 1 on Tom Hanks, 1 on the astronaut).
    """
    det = det_torch if backend == "torch" else det_onnx
    for name, img in photos.items():
        boxes, probs, points = facenet_detections[name]
        got = det.detect(img)
        assert len(got) == len(boxes), name
        match = _iou(boxes.astype(np.float32), got.boxes).argmax(1)
        assert sorted(match.tolist()) == list(range(len(got)))
        assert _iou(boxes.astype(np.float32), got.boxes)[np.arange(len(got)), match].min() >= 0.99
        assert np.abs(got.landmarks[match] - points).max() <= 0.5, name
        assert np.abs(got.scores[match] - probs.astype(np.float32)).max() <= 1e-4, name


def test_onnx_and_torch_backends_agree(photos, det_torch, det_onnx):
    for name, img in photos.items():
        a, b = det_torch.detect(img), det_onnx.detect(img)
        assert len(a) == len(b), name
        assert np.abs(a.boxes - b.boxes).max() <= 1e-2
        assert np.abs(a.landmarks - b.landmarks).max() <= 1e-2
        assert np.abs(a.scores - b.scores).max() <= 1e-4


def test_real_photo_counts_and_layout(photos, det_onnx):
    det = FaceDetector()  # default config: min_score 0.9
    det._nets = det_onnx._nets  # reuse the temp-cache sessions
    expected = {"photo_t1": 6, "photo_tom_hanks": 1, "photo_astronaut": 1}
    for name, img in photos.items():
        d = det.detect(img)
        assert len(d) == expected[name], name
        assert d.boxes.dtype == d.scores.dtype == d.landmarks.dtype == np.float32
        assert d.boxes.shape == (len(d), 4) and d.landmarks.shape == (len(d), 5, 2)
        assert np.all(np.diff(d.scores) <= 0)
        # landmarks: eyes above nose above mouth, image-left before image-right
        lm = d.landmarks
        assert np.all(lm[:, 0, 0] < lm[:, 1, 0]) and np.all(lm[:, 3, 0] < lm[:, 4, 0])
        assert np.all(lm[:, [0, 1], 1].max(1) < lm[:, 2, 1]) and np.all(lm[:, 2, 1] < lm[:, [3, 4], 1].min(1))
        inside = (lm[..., 0] >= d.boxes[:, None, 0]) & (lm[..., 0] <= d.boxes[:, None, 2])
        assert inside.all()
    # facenet-pytorch's raw output on t1 has 2 more: a hand (0.87) and a glass (0.86)
    raw = det_onnx.detect(photos["photo_t1"])
    assert len(raw) == 8 and np.sort(raw.scores)[:2].max() < 0.9


def test_every_dlib_face_is_found(photos, det_onnx):
    """dlib HOG (upsample 1) faces with score >= 0.5 must each match one of ours with IoU >= 0.5.

    Conventions: dlib's rectangle is inclusive (right/bottom + 1 -> x2/y2) and
    tighter (brows to chin) than MTCNN's; measured IoUs are 0.60-0.78. The
    score floor drops dlib's one false positive here (astronaut's mission
    patch, score 0.12).
    """
    hog = dlib.get_frontal_face_detector()
    det = FaceDetector()
    det._nets = det_onnx._nets
    for name, img in photos.items():
        rects, scores, _ = hog.run(img, 1, 0.0)
        ref = np.array(
            [[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r, s in zip(rects, scores) if s >= 0.5],
            np.float32,
        )
        assert len(ref) >= 1, name
        ours = det.detect(img)
        iou = _iou(ref, ours.boxes)
        assert (iou.max(1) >= 0.5).all(), (name, iou.max(1))
        assert len(set(iou.argmax(1).tolist())) == len(ref)  # one of ours per dlib face


def test_batch_equals_single(photos, det_onnx):
    t1 = photos["photo_t1"]
    crop = np.ascontiguousarray(t1[100:612, 300:812])  # same size as the astronaut: shares PNet calls
    images = [t1, photos["photo_tom_hanks"], photos["photo_astronaut"], crop]
    batch = det_onnx.detect_batch(images)
    assert len(batch) == 4
    for img, got in zip(images, batch):
        one = det_onnx.detect(img)
        assert len(one) == len(got)
        np.testing.assert_allclose(one.boxes, got.boxes, atol=1e-3)
        np.testing.assert_allclose(one.landmarks, got.landmarks, atol=1e-3)
    assert det_onnx.detect_batch([]) == []


def test_max_side_downscales_and_maps_back(photos, det_onnx):
    t1 = photos["photo_t1"]
    small = FaceDetector(DetectorConfig(max_side=640))
    small._nets = det_onnx._nets
    half = small.detect(t1)  # t1 is 1280 px wide: processed at half size
    ref = FaceDetector()
    ref._nets = det_onnx._nets
    want = ref.detect(t1)
    assert len(half) == len(want) == 6
    iou = _iou(want.boxes, half.boxes)
    match = iou.argmax(1)
    assert sorted(match.tolist()) == list(range(6))
    assert iou.max(1).min() >= 0.8
    assert np.abs(want.landmarks - half.landmarks[match]).max() <= 8.0  # measured 6.2 px on ~100 px faces


# ----------------------------------------------------------------------------- edge cases


def _assert_empty(d) -> None:
    assert len(d) == 0
    assert d.boxes.shape == (0, 4) and d.scores.shape == (0,) and d.landmarks.shape == (0, 5, 2)
    assert d.boxes.dtype == d.scores.dtype == d.landmarks.dtype == np.float32


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_no_face_gives_empty_arrays(backend, det_onnx, det_torch):
    det = det_onnx if backend == "onnx" else det_torch
    rng = np.random.default_rng(0)
    _assert_empty(det.detect(np.full((240, 320, 3), 128, np.uint8)))
    _assert_empty(det.detect(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)))
    _assert_empty(det.detect(np.zeros((10, 10, 3), np.uint8)))
    _assert_empty(det.detect(np.zeros((1, 1, 3), np.uint8)))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((64, 64, 3), np.float32),
        np.zeros((64, 64), np.uint8),
        np.zeros((64, 64, 4), np.uint8),
        np.zeros((0, 64, 3), np.uint8),
        [[0, 0, 0]],
    ],
)
def test_invalid_input_names_image(bad, det_onnx):
    with pytest.raises(InvalidInputError) as info:
        det_onnx.detect(bad)
    assert info.value.input_name == "image"


def test_invalid_batch_item_named(det_onnx):
    with pytest.raises(InvalidInputError) as info:
        det_onnx.detect_batch([np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.uint8)])
    assert info.value.input_name == "images[1]"


def test_cascade_with_every_box_outside_the_image():
    """PNet fires, but regression throws every box off the image: no crop, no RNet call, K=0."""

    def pnet(x: np.ndarray):
        probs = np.zeros((len(x), 2, 3, 3), np.float32)
        probs[:, 1, 0, 0] = 1.0
        return np.full((len(x), 4, 3, 3), -100.0, np.float32), probs

    def never(x: np.ndarray):
        raise AssertionError("called with no valid crop")

    (res,) = run_cascade([np.zeros((64, 64, 3), np.uint8)], pnet, never, never, CascadeParams())
    assert res[0].shape == (0, 4) and res[1].shape == (0,) and res[2].shape == (0, 5, 2)


def test_unknown_backend():
    with pytest.raises(InvalidInputError):
        FaceDetector(backend="tensorrt")  # type: ignore[arg-type]
