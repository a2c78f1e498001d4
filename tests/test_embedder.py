"""dlib ResNet port: .dat reader, dlib-style chips, torch/ONNX parity with dlib-bin.

dlib (dlib-bin) is used here only as the reference oracle. Measured on this
machine (t1.jpg's 6 faces, Tom Hanks, astronaut and 8 flipped/cropped/rescaled
variants, 16 faces): chip mean |diff| <= 0.11 (max pixel diff 3); descriptor
max |diff| vs dlib ~3e-7 (torch and ONNX, same chips) and ~1.5e-3 end to end
(our chips + ONNX); all 120 same/different verdicts identical; MTCNN-template
chips vs dlib chips: embedding cosine >= 0.969.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

dlib = pytest.importorskip("dlib")
cv2 = pytest.importorskip("cv2")
torch = pytest.importorskip("torch")

from facetron.assets import asset_path  # noqa: E402
from facetron.errors import InvalidInputError  # noqa: E402
from facetron.faces.alignment import align_dlib5, align_faces, roll_angle  # noqa: E402
from facetron.faces.dlib_dat import DatFormatError, read_dlib_dat  # noqa: E402
from facetron.faces.embedder import (  # noqa: E402
    FaceEmbedder,
    cosine_similarity,
    dlib_same_person,
    embedder_onnx_path,
)
from facetron.faces.embedder_net import DlibResNet, DlibResNetConfig  # noqa: E402
from facetron.imageio import load_image  # noqa: E402

PARITY_BOUND = 1e-3
CHIP_MEAN_BOUND = 0.5
CHIP_MAX_BOUND = 8
END_TO_END_BOUND = 1e-2
MTCNN_COSINE_BOUND = 0.95


# --------------------------------------------------------------------------------------
# fixtures (module-scoped: the .dat is parsed once, dlib runs once per face)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dat():
    return read_dlib_dat(asset_path("dlib_resnet"))


@pytest.fixture(scope="module")
def net(dat):
    return DlibResNet(DlibResNetConfig()).load_dlib(dat).eval()


@pytest.fixture(scope="module")
def embedder(net, tmp_path_factory):
    """FaceEmbedder on a private cache; the ONNX file is exported from ``net``."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("cache")
        mp.setenv("FACETRON_CACHE", str(cache))
        path = embedder_onnx_path(net=net)  # exported from the already-parsed net
        assert path.parent == cache / "onnx" and path.name.startswith("dlib_resnet_v1_")
        e = FaceEmbedder(intra_op_num_threads=2)
        e._ort_session()  # opened (and cached) while FACETRON_CACHE points at the temp cache
        yield e


def _pts(shape) -> np.ndarray:
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


def _mtcnn5_from_68(p68: np.ndarray) -> np.ndarray:
    return np.stack([p68[36:42].mean(0), p68[42:48].mean(0), p68[30], p68[48], p68[54]])


@pytest.fixture(scope="module")
def faces():
    """Real faces: (label, identity, image, 5-pt shape, 68-pt shape, dlib chip)."""
    det = dlib.get_frontal_face_detector()
    sp5 = dlib.shape_predictor(str(asset_path("dlib_shape5")))
    sp68 = dlib.shape_predictor(str(asset_path("dlib_shape68")))

    def best(img):
        rects, scores, _ = det.run(img, 1, 0.0)
        return [r for r, _s in sorted(zip(rects, scores), key=lambda t: -t[1])]

    items = []
    t1 = load_image(asset_path("photo_t1"))
    t1_rects = sorted(best(t1), key=lambda r: r.left())
    assert len(t1_rects) == 6
    items += [(f"t1_{i}", f"t1_{i}", t1, r) for i, r in enumerate(t1_rects)]
    hanks = load_image(asset_path("photo_tom_hanks"))
    astro = load_image(asset_path("photo_astronaut"))
    items.append(("hanks", "hanks", hanks, best(hanks)[0]))
    items.append(("astronaut", "astronaut", astro, best(astro)[0]))
    # Same-person variants: horizontal flips, crops and rescales.
    flip = cv2.resize(np.ascontiguousarray(hanks[:, ::-1]), None, fx=1.7, fy=1.7)
    items.append(("hanks_flip_x1.7", "hanks", flip, best(flip)[0]))
    crop = cv2.resize(np.ascontiguousarray(astro[40:260, 120:330, :][:, ::-1]), None,
                      fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA)
    items.append(("astronaut_crop_flip", "astronaut", crop, best(crop)[0]))
    for i, r in enumerate(t1_rects):
        w, cx, cy = r.width(), (r.left() + r.right()) // 2, (r.top() + r.bottom()) // 2
        c = t1[max(cy - w, 0):cy + w, max(cx - w, 0):cx + w][:, ::-1]
        c = cv2.resize(np.ascontiguousarray(c), None, fx=1.3, fy=1.3)
        items.append((f"t1_{i}_crop_flip", f"t1_{i}", c, best(c)[0]))

    out = []
    for label, ident, img, rect in items:
        s5 = sp5(img, rect)
        out.append(dict(label=label, ident=ident, image=img, p5=_pts(s5),
                        p68=_pts(sp68(img, rect)), dlib_chip=dlib.get_face_chip(img, s5, 150, 0.25)))
    return out


@pytest.fixture(scope="module")
def dlib_chips(faces):
    return np.stack([f["dlib_chip"] for f in faces])


@pytest.fixture(scope="module")
def dlib_desc(dlib_chips):
    fr = dlib.face_recognition_model_v1(str(asset_path("dlib_resnet")))
    return np.array([np.array(d) for d in fr.compute_face_descriptor(list(dlib_chips))])


# --------------------------------------------------------------------------------------
# .dat reader
# --------------------------------------------------------------------------------------


def test_dat_layers(dat):
    kinds = [layer.kind for layer in dat.layers]
    assert kinds[0] == "input" and kinds[-1] == "loss_metric"
    assert len(kinds) == 132
    counts = {k: kinds.count(k) for k in set(kinds)}
    assert counts == {"input": 1, "con": 29, "affine": 29, "relu": 29, "max_pool": 1, "tag": 18,
                      "skip": 4, "avg_pool": 5, "add_prev": 14, "fc": 1, "loss_metric": 1}
    assert dat.layers[0].attrs["avg_rgb"] == pytest.approx((122.782, 117.001, 104.298), abs=1e-4)
    cons = dat.of_kind("con")
    assert cons[0].arrays["weight"].shape == (32, 3, 7, 7) and cons[0].attrs["stride"] == 2
    assert [c.attrs["num_filters"] for c in cons[1::2]] == [32] * 3 + [64] * 4 + [128] * 3 + [256] * 4
    assert dat.of_kind("fc")[0].arrays["weight"].shape == (256, 128)
    assert "bias" not in dat.of_kind("fc")[0].arrays
    for a in dat.of_kind("affine"):
        assert a.arrays["gamma"].dtype == np.float32 and np.all(np.isfinite(a.arrays["gamma"]))


@pytest.fixture(scope="module")
def dat_bytes():
    return asset_path("dlib_resnet").read_bytes()


@pytest.mark.parametrize("cut", [0, 5, 200, 11_000_000, -1])
def test_dat_truncated(tmp_path, dat_bytes, cut):
    data = dat_bytes
    bad = tmp_path / "truncated.dat"
    bad.write_bytes(data[:cut] if cut >= 0 else data[:-1])
    with pytest.raises(DatFormatError) as exc:
        read_dlib_dat(bad)
    msg = str(exc.value)
    assert str(bad) in msg and "expected" in msg


def test_dat_corrupt(tmp_path, dat_bytes):
    data = bytearray(dat_bytes)
    at = data.index(b"con_4") if b"con_4" in data else data.index(b"con_")
    data[at:at + 4] = b"cxn_"
    bad = tmp_path / "corrupt.dat"
    bad.write_bytes(bytes(data))
    with pytest.raises(DatFormatError, match=r"corrupt\.dat.*expected one of \['con_4'"):
        read_dlib_dat(bad)
    with pytest.raises(DatFormatError, match="no such file"):
        read_dlib_dat(tmp_path / "missing.dat")


# --------------------------------------------------------------------------------------
# chips, parity, verdicts
# --------------------------------------------------------------------------------------


def test_chips_match_dlib(faces):
    diffs = []
    for f in faces:
        ours = align_dlib5(f["image"], f["p5"])
        assert ours.shape == (150, 150, 3) and ours.dtype == np.uint8
        d = np.abs(ours.astype(np.int16) - f["dlib_chip"].astype(np.int16))
        diffs.append((f["label"], float(d.mean()), int(d.max())))
    worst_mean = max(m for _, m, _ in diffs)
    worst_max = max(x for _, _, x in diffs)
    assert worst_mean <= CHIP_MEAN_BOUND, diffs
    assert worst_max <= CHIP_MAX_BOUND, diffs


def test_torch_parity(net, dlib_chips, dlib_desc):
    with torch.no_grad():
        ours = net(torch.from_numpy(dlib_chips).permute(0, 3, 1, 2).float()).numpy()
    assert np.abs(ours - dlib_desc).max() <= PARITY_BOUND


def test_onnx_parity(embedder, dlib_chips, dlib_desc):
    desc = embedder.descriptors(dlib_chips)
    assert desc.dtype == np.float32 and desc.shape == (len(dlib_chips), 128)
    assert np.abs(desc - dlib_desc).max() <= PARITY_BOUND
    emb = embedder.embed(dlib_chips)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, desc / np.linalg.norm(desc, axis=1, keepdims=True), atol=1e-6)
    # single-chip calls agree with the batch
    np.testing.assert_allclose(embedder.descriptors(dlib_chips[:1]), desc[:1], atol=1e-5)


def test_same_person_verdicts_match_dlib(faces, embedder, dlib_desc):
    ours = embedder.descriptors(np.stack([align_dlib5(f["image"], f["p5"]) for f in faces]))
    assert np.abs(ours - dlib_desc).max() <= END_TO_END_BOUND
    mismatches, n_same = [], 0
    for i, j in itertools.combinations(range(len(faces)), 2):
        ref = bool(np.linalg.norm(dlib_desc[i] - dlib_desc[j]) < 0.6)
        got = dlib_same_person(ours[i], ours[j])
        if ref != got:
            mismatches.append((faces[i]["label"], faces[j]["label"]))
        if faces[i]["ident"] == faces[j]["ident"]:
            n_same += 1
            assert got and ref, (faces[i]["label"], faces[j]["label"])
    assert not mismatches
    assert n_same == 8


def test_mtcnn_template_alignment(faces, embedder, dlib_chips):
    landmarks = [_mtcnn5_from_68(f["p68"]).astype(np.float32)[None] for f in faces]
    chips = np.concatenate([align_faces(f["image"], lm) for f, lm in zip(faces, landmarks)])
    assert chips.shape == (len(faces), 150, 150, 3)
    cos = np.sum(embedder.embed(chips) * embedder.embed(dlib_chips), axis=1)
    assert cos.min() >= MTCNN_COSINE_BOUND, dict(zip([f["label"] for f in faces], cos.round(4)))


# --------------------------------------------------------------------------------------
# small API checks
# --------------------------------------------------------------------------------------


def test_align_faces_batch_and_roll():
    img = load_image(asset_path("photo_tom_hanks"))
    lm = np.array([[40, 50], [70, 50], [55, 65], [43, 80], [68, 80]], np.float32)
    chips = align_faces(img, np.stack([lm, lm]), size=112)
    assert chips.shape == (2, 112, 112, 3) and np.array_equal(chips[0], chips[1])
    assert align_faces(img, np.zeros((0, 5, 2), np.float32)).shape == (0, 150, 150, 3)
    theta = np.deg2rad(12.0)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    assert roll_angle(lm @ rot.T) == pytest.approx(12.0, abs=1e-4)
    with pytest.raises(InvalidInputError, match="landmarks"):
        align_faces(img, lm)  # missing K axis


def test_onnx_file_cached_and_signature(embedder):
    path = embedder_onnx_path()
    mtime = path.stat().st_mtime_ns
    assert embedder_onnx_path() == path and path.stat().st_mtime_ns == mtime  # no re-export
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]
    sess = embedder._ort_session()
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("faces", "tensor(uint8)", [150, 150, 3])
    assert isinstance(inp.shape[0], str)  # dynamic batch
    outs = {o.name: (o.type, o.shape[1:]) for o in sess.get_outputs()}
    assert outs == {"descriptors": ("tensor(float)", [128]), "embeddings": ("tensor(float)", [128])}


def test_bad_input(embedder):
    good = np.zeros((2, 150, 150, 3), np.uint8)
    bad_inputs = [good.astype(np.float32), good[:, :112, :112], good[0], good[..., :1], list(good)]
    for bad in bad_inputs:
        with pytest.raises(InvalidInputError) as exc:
            embedder.embed(bad)
        assert exc.value.input_name == "faces"
    empty = embedder.embed(np.zeros((0, 150, 150, 3), np.uint8))
    assert empty.shape == (0, 128) and empty.dtype == np.float32


def test_similarity_helpers():
    a = np.array([3.0, 4.0] + [0.0] * 126, np.float32)
    b = np.array([4.0, 3.0] + [0.0] * 126, np.float32)
    assert cosine_similarity(a, b) == pytest.approx(24 / 25)
    assert cosine_similarity(np.stack([a, b]), np.stack([a, b, a])).shape == (2, 3)
    assert dlib_same_person(a * 0.1, b * 0.1)          # distance 0.141
    assert not dlib_same_person(a, b)                  # distance 1.41
