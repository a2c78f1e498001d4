"""``portrait``'s path in-process on real photos: it ranks what was generated
(not the pasted user photo), fuses by a strength, scores both, and says
which similarity ranked.

The generator is replaced by real photos standing in for generated
candidates (the tiny smoke model makes no faces; ``PhotoGenerator`` offers
what run_portrait uses of ``ServedGenerator``): the rest of
``run_portrait`` — ranking, fusion, scoring, the report — runs unchanged
with the real face detector and embedder in-process (the same callables as
BLS inside Triton; tests/test_triton_portrait.py runs it served)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest

from face_photos import photo, square_crop
from facetron.contract import GeneratorParams
from facetron.errors import InvalidInputError
from facetron.faces.alignment import align_faces
from facetron.faces.detector import FaceDetector
from facetron.faces.embedder import FaceEmbedder
from facetron.imageio import save_image
from facetron.pipeline.net_io import pack_detections
from facetron import contract
from facetron.pipeline.job import build_job, build_portrait_job
from facetron.pipeline.portrait import run_portrait
from facetron.request import GeneratorRequest, PortraitRequest
from facetron.pipeline.template import prepare_template
from facetron.users import UserRegistry

SIZE = 256
INFO = {"resolution": SIZE, "latent_factor": 8, "is_smoke_model": False, "name": "photos standing in for a generator"}


@pytest.fixture(scope="module")
def faces():
    det, emb = FaceDetector(), FaceEmbedder()
    return (lambda images: pack_detections(det.detect_batch(list(images)))), emb.embed, det


def _crop(image: np.ndarray, det: FaceDetector, k: int = 0) -> np.ndarray:
    boxes = det.detect(image).boxes
    order = np.argsort(boxes[:, 0])  # left to right (t1)
    return square_crop(image, boxes[order[k]], 0.6, SIZE)


@pytest.fixture(scope="module")
def photos(faces) -> dict[str, np.ndarray]:
    det = faces[2]
    astro = photo("astronaut")
    return {
        "astronaut": _crop(astro, det),
        "astronaut_mirror": _crop(astro[:, ::-1].copy(), det),
        "tom": _crop(photo("tom_hanks"), det),
        "t1_2": _crop(photo("t1"), det, 2),
        "t1_4": _crop(photo("t1"), det, 4),
    }


@pytest.fixture(scope="module")
def registry(tmp_path_factory, faces, photos) -> UserRegistry:
    """The user is the astronaut: reference from the photo, template (the fusion
    source) = the astronaut crop and its landmarks."""
    detect, embed, det = faces
    root = tmp_path_factory.mktemp("portrait_ranking")
    template = photos["astronaut"]
    lm = det.detect(template).landmarks[0]
    save_image(root / "template.png", template)
    (root / "template.json").write_text(json.dumps({"landmarks": lm.tolist()}))
    reference = embed(align_faces(template, lm[None]))
    registry = UserRegistry(root / "users")
    registry.register("astro", reference, root / "template.png", root / "template.json", {"subject": "a woman"})
    return registry


@dataclass
class PhotoGenerator:
    """What run_portrait needs of ServedGenerator (job, template, images,
    registry, info), with given pictures as the 'generated' candidates; the
    template (if any) is fitted and detected in-process."""

    registry: UserRegistry
    pictures: np.ndarray
    detect: object
    info: dict = field(default_factory=lambda: dict(INFO))
    params: GeneratorParams = GeneratorParams()

    def portrait_job(self, request):
        return build_portrait_job(request, self.info, self.registry, self.params)

    def template(self, job):
        if job.template is None:
            return None
        return prepare_template(job.template, job.sampling.height, job.sampling.width, self.detect)

    def images(self, job, template, progress=None):
        return self.pictures.copy()


def _run(registry, faces, pictures, **inputs):
    detect, embed, _ = faces
    gen = PhotoGenerator(registry, np.stack(pictures), detect)
    request = PortraitRequest(user_id="astro", num_images=len(pictures), **inputs)
    out = run_portrait(request, gen, detect=detect, embed=embed)
    return out, json.loads(out["report"][0])


def test_ranks_the_generated_faces_not_the_fused_ones(registry, faces, photos) -> None:
    """Candidates: two strangers, the user (mirror view), a third stranger.
    Ranked by the generated faces, the user's own picture comes first and
    the strangers follow in their generated order; after full-strength
    fusion the strangers carry the user's face, so their final similarities
    are higher (measured: 0.87/0.85/0.83 -> 0.91/0.91/0.89) — reported,
    but they did not rank."""
    names = ["tom", "t1_2", "astronaut_mirror", "t1_4"]
    out, report = _run(registry, faces, [photos[n] for n in names], fusion_strength=1.0, seed=3)
    gen, final = out["similarity_generated"], out["similarity_final"]
    assert report["ranked_by"] == "generated"
    np.testing.assert_array_equal(out["similarity"], gen)
    assert np.all(np.isfinite(gen)) and int(np.argmax(gen)) == 2
    assert out["rank"][2] == 0 and out["selected"][0] == 2
    assert list(out["selected"]) == list(np.argsort(-gen, kind="stable"))
    strangers = [0, 1, 3]
    assert np.all(gen[strangers] < 0.93) and gen[2] > 0.95
    assert np.all(final[strangers] > gen[strangers] + 0.02), (gen, final)  # fusion moved identity in
    assert report["fusion"]["fused"] == [True] * 4 and report["fusion"]["strength"] == 1.0
    assert report["seed"] == 3 and report["seed_source"] == "request"


def test_strength_zero_and_fuse_false_return_the_generated_pictures(registry, faces, photos) -> None:
    pics = [photos["t1_2"], photos["astronaut_mirror"]]
    for kwargs in ({"fusion_strength": 0.0}, {"fuse": False}):
        out, report = _run(registry, faces, pics, **kwargs)
        order = out["selected"]
        np.testing.assert_array_equal(out["images"], np.stack(pics)[order])
        np.testing.assert_array_equal(out["similarity_final"], out["similarity_generated"])
        assert report["fusion"]["fused"] == [False, False] and report["fusion"]["source"] is None
    full, _ = _run(registry, faces, pics, fusion_strength=1.0)
    half, _ = _run(registry, faces, pics, fusion_strength=0.5)
    stranger_full, stranger_half = full["similarity_final"][0], half["similarity_final"][0]
    assert stranger_full > stranger_half > full["similarity_generated"][0]  # more strength, more of the user


def test_a_template_without_generated_faces_ranks_by_final_and_says_so(registry, faces, photos) -> None:
    """What the tiny smoke model does: the template's face region comes back as
    noise. No generated face -> similarity_generated NaN; fusion puts the
    user's face at the template's face; ranking falls back to the final
    similarity and the report says why."""
    detect, _, det = faces
    template = photos["t1_2"]
    prepared = prepare_template(template, SIZE, SIZE, detect)
    from facetron.pipeline.template import face_region_mask

    mask = face_region_mask(template.shape, prepared.landmarks)
    rng = np.random.default_rng(0)
    noisy = [(template * (1 - mask) + rng.integers(0, 255, template.shape) * mask).astype(np.uint8) for _ in range(2)]
    out, report = _run(registry, faces, noisy, template=template, fusion_strength=0.7, top_k=1)
    assert np.all(np.isnan(out["similarity_generated"]))
    assert report["ranked_by"] == "final" and "no generated candidate" in report["ranked_by_reason"]
    assert report["fusion"]["at"][0].startswith("template face")
    assert np.all(np.isfinite(out["similarity_final"])) and out["images"].shape == (1, SIZE, SIZE, 3)
    np.testing.assert_array_equal(out["similarity"], out["similarity_final"])
    assert "similarity_final" in report["provenance"]


def test_options_and_their_errors() -> None:
    def strength(**kw):
        return PortraitRequest(user_id="astro", **kw).strength_of_fusion

    assert strength() == 0.5
    assert strength(fuse=False) == 0.0
    assert strength(fuse=True, fusion_strength=0.3) == pytest.approx(0.3)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(InvalidInputError, match=r"fusion_strength: must be in \[0, 1\]"):
            strength(fusion_strength=bad)
    with pytest.raises(InvalidInputError, match="fuse: false turns fusion off"):
        strength(fuse=False, fusion_strength=0.4)
    with pytest.raises(InvalidInputError, match=r"top_k: must be in 0..num_images \(2"):
        PortraitRequest(user_id="astro", num_images=2, top_k=-1)
    with pytest.raises(InvalidInputError, match="strength: only applies with a template"):
        PortraitRequest(user_id="astro", strength=0.5)


def test_one_user_id_validation_per_portrait_request(registry, faces, photos, monkeypatch) -> None:
    """A portrait request validates its user id once, where it is parsed (the
    wire tensors -> PortraitRequest); the registry, the job and the answer take
    the checked id as it is."""
    calls = []
    pattern = contract.USER_ID_PATTERN

    class Counting:
        def fullmatch(self, text):
            calls.append(text)
            return pattern.fullmatch(text)

    monkeypatch.setattr(contract, "USER_ID_PATTERN", Counting())
    pics = [photos["t1_2"], photos["astronaut_mirror"]]
    detect, embed, _ = faces
    wire = PortraitRequest(user_id="astro", num_images=2, seed=1).to_arrays()
    calls.clear()
    request = PortraitRequest.from_arrays(wire)
    out = run_portrait(request, PhotoGenerator(registry, np.stack(pics), detect), detect=detect, embed=embed)
    validated = list(calls)
    assert validated == ["astro"]
    assert json.loads(out["report"][0])["user_version"] == registry.version("astro")


def test_a_request_without_a_seed_gets_a_random_one(registry) -> None:
    seeds = {build_job(GeneratorRequest(user_id="astro"), INFO, registry).sampling.seed for _ in range(4)}
    assert len(seeds) > 1  # 4 draws from 2**31: equal by chance with probability ~3e-9
    assert build_job(GeneratorRequest(user_id="astro", seed=0), INFO, registry).sampling.seed == 0
    assert build_job(GeneratorRequest(user_id="astro", seed=77), INFO, registry).sampling.seed == 77
