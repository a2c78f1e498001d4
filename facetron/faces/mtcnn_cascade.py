"""The MTCNN cascade (pyramid -> PNet -> RNet -> ONet) in vectorised numpy/cv2.

It reproduces facenet-pytorch's ``detect_face`` numerics, quirks included,
so the two give the same boxes:

- every resize (pyramid levels and the 24/48 px crops) is torch's
  ``interpolate(mode="area")``, i.e. adaptive average pooling with bins
  ``[floor(i*n/m), ceil((i+1)*n/m))``, rounded as ``sum / kh / kw`` in
  float32. cv2's INTER_AREA weights fractional pixels instead (different
  values whenever n/m is not an integer), so it is *not* used: both resizes
  are computed from one integral image per input (four gathers per output
  pixel, all boxes at once), bit-for-bit equal to torch's output;
- boxes are float32 and use facenet-pytorch's formulas: PNet cells
  ``floor((2*xy + 1)/scale)`` .. ``floor((2*xy + 12)/scale)``, regression
  without ``+1`` after stage 1 and with ``+1`` after stages 2/3, squaring
  (``rerec``), integer crop windows ``[trunc(y1)-1, trunc(y2))`` clipped to the
  image (crops are the clipped region stretched, not zero padded);
- NMS: IoU > 0.5 per scale, IoU > 0.7 across scales, IoU > 0.7 after RNet
  (torchvision semantics: no ``+1``, stable descending sort), and
  intersection-over-min > 0.7 with ``+1`` areas after ONet.

Coordinates come out in facenet-pytorch's convention (pixel units, boxes not
clipped to the image, so a face cut by the border can extend past it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np

from facetron.contract import MTCNN_MIN_FACE_SIZE

NetFn = Callable[[np.ndarray], Sequence[np.ndarray]]
"""A net runner: float32 NCHW normalised input -> the net's outputs as numpy."""

NET_BATCH = 512
"""R/O-net crops per forward call (bounds memory, like facenet-pytorch)."""

_NMS_CHUNK = 1024


@dataclass(frozen=True)
class CascadeParams:
    """The cascade's settings; the defaults are facenet-pytorch's."""

    min_face_size: float = MTCNN_MIN_FACE_SIZE
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709
    nms_pnet_scale: float = 0.5
    nms_pnet_image: float = 0.7
    nms_rnet: float = 0.7
    nms_onet: float = 0.7


# ----------------------------------------------------------------------------- resampling


def integral_image(image: np.ndarray) -> np.ndarray:
    """Channel-first summed-area table [3, H+1, W+1]; int32 when it cannot overflow, else float64."""
    h, w = image.shape[:2]
    depth = cv2.CV_32S if h * w * 255 < 2**31 else cv2.CV_64F
    table = cv2.integral(np.ascontiguousarray(image), sdepth=depth)
    return np.ascontiguousarray(table.transpose(2, 0, 1))


def _bins(start: np.ndarray | int, length: np.ndarray | int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive-pool bin edges [..., size] for windows (start, length), as torch computes them."""
    i = np.arange(size, dtype=np.int64)
    length = np.asarray(length, dtype=np.int64)[..., None]
    lo = (i * length) // size
    hi = -((-(i + 1) * length) // size)  # ceil
    start = np.asarray(start, dtype=np.int64)[..., None]
    return start + lo, start + hi


def _normalised_means(sums: np.ndarray, kh: np.ndarray, kw: np.ndarray) -> np.ndarray:
    """Bin sums -> MTCNN net input, float32.

    The mean is rounded exactly as torch's adaptive_avg_pool2d does
    (``sum / kh / kw`` in float32), then normalised like facenet-pytorch:
    ``(mean - 127.5) * 0.0078125``. ``kh``/``kw`` broadcast against ``sums``.
    """
    out = sums.astype(np.float32)
    out /= kh.astype(np.float32)
    out /= kw.astype(np.float32)
    out -= np.float32(127.5)
    out *= np.float32(0.0078125)
    return out


def area_resize(integral: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Whole image resized like ``interpolate(mode="area")`` and normalised: [3, out_h, out_w].

    Two row gathers of the integral image give per-row-bin cumulative column
    sums; two column gathers of those give the bin sums.
    """
    h, w = integral.shape[1] - 1, integral.shape[2] - 1
    r0, r1 = _bins(0, h, out_h)
    c0, c1 = _bins(0, w, out_w)
    bands = np.take(integral, r1, axis=1) - np.take(integral, r0, axis=1)  # [3, out_h, W+1]
    sums = np.take(bands, c1, axis=2) - np.take(bands, c0, axis=2)
    return _normalised_means(sums, (r1 - r0)[:, None], c1 - c0)


def area_crops(integral: np.ndarray, windows: np.ndarray, size: int) -> np.ndarray:
    """Normalised crops [K, 3, size, size] of integer windows [K, 4] = (y0, y1, x0, x1), end exclusive.

    Each output pixel is four lookups in the integral image, each done as one
    ``np.take`` over all boxes at once.
    """
    r0, r1 = _bins(windows[:, 0], windows[:, 1] - windows[:, 0], size)
    c0, c1 = _bins(windows[:, 2], windows[:, 3] - windows[:, 2], size)
    width = integral.shape[2]
    planes = integral.reshape(3, -1)

    def at(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        return np.take(planes, (r * width)[:, :, None] + c[:, None, :], axis=1)  # [3, K, s, s]

    sums = (at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)).transpose(1, 0, 2, 3)
    return _normalised_means(sums, (r1 - r0)[:, None, :, None], (c1 - c0)[:, None, None, :])


# ----------------------------------------------------------------------------- boxes


def _overlap(a: np.ndarray, b: np.ndarray, mode: str) -> np.ndarray:
    """Pairwise overlap [len(a), len(b)] in float32, ``union`` (torchvision IoU) or ``min`` (+1 areas).

    The float32 operation order follows torchvision's / facenet-pytorch's, so
    threshold decisions agree with theirs bit for bit.
    """
    one = np.float32(1.0 if mode == "min" else 0.0)
    ax1, ay1, ax2, ay2 = (np.ascontiguousarray(a[:, k])[:, None] for k in range(4))
    bx1, by1, bx2, by2 = (np.ascontiguousarray(b[:, k])[None, :] for k in range(4))
    area_a = (ax2 - ax1 + one) * (ay2 - ay1 + one)
    area_b = (bx2 - bx1 + one) * (by2 - by1 + one)
    inter = np.minimum(ax2, bx2)
    inter -= np.maximum(ax1, bx1)
    inter += one
    np.maximum(inter, np.float32(0), out=inter)
    h = np.minimum(ay2, by2)
    h -= np.maximum(ay1, by1)
    h += one
    np.maximum(h, np.float32(0), out=h)
    inter *= h
    denom = np.minimum(area_a, area_b) if mode == "min" else (area_a + area_b) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        inter /= denom
    return inter


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    groups: np.ndarray | None = None,
    mode: str = "union",
) -> np.ndarray:
    """Exact greedy NMS, vectorised; returns kept indices, highest score first.

    A box is dropped when its overlap with a kept, higher-scoring box of the
    same group exceeds ``threshold``. Instead of a Python loop per kept box,
    boxes are taken in score-sorted chunks: each chunk is first suppressed by
    the boxes already kept, then the greedy rule inside the chunk is solved as
    the fixed point of ``keep[i] = cand[i] and not any(keep[j] and S[j, i], j < i)``
    (unique, hence equal to the sequential result; a few matrix-vector
    iterations in practice).
    """
    n = len(scores)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    b = np.ascontiguousarray(boxes[order, :4], dtype=np.float32)
    g = None if groups is None else np.asarray(groups)[order]
    thr = np.float32(threshold)
    keep = np.zeros(n, dtype=bool)
    for start in range(0, n, _NMS_CHUNK):
        stop = min(n, start + _NMS_CHUNK)
        cand = np.ones(stop - start, dtype=bool)
        kept = np.flatnonzero(keep[:start])
        if kept.size:
            sup = _overlap(b[kept], b[start:stop], mode) > thr
            if g is not None:
                sup &= g[kept, None] == g[None, start:stop]
            cand = ~sup.any(axis=0)
        sup = np.triu(_overlap(b[start:stop], b[start:stop], mode) > thr, k=1)
        if g is not None:
            sup &= g[start:stop, None] == g[None, start:stop]
        sup_f = sup.astype(np.float32)
        k = cand
        while True:
            new = cand & ~((k.astype(np.float32) @ sup_f) > 0)
            if np.array_equal(new, k):
                break
            k = new
        keep[start:stop] = k
    return order[keep]


def regress(boxes: np.ndarray, offsets: np.ndarray, plus_one: bool) -> np.ndarray:
    """Apply box offsets (fractions of width/height); ``plus_one`` as in facenet's bbreg."""
    one = np.float32(1.0 if plus_one else 0.0)
    w = boxes[:, 2] - boxes[:, 0] + one
    h = boxes[:, 3] - boxes[:, 1] + one
    scale = np.stack([w, h, w, h], axis=1)
    return (boxes[:, :4] + offsets[:, :4] * scale).astype(np.float32)


def square(boxes: np.ndarray) -> np.ndarray:
    """Grow boxes to squares of side max(w, h) around their centres (facenet's ``rerec``)."""
    h = boxes[:, 3] - boxes[:, 1]
    w = boxes[:, 2] - boxes[:, 0]
    side = np.maximum(w, h)
    half = np.float32(0.5)
    x1 = boxes[:, 0] + w * half - side * half
    y1 = boxes[:, 1] + h * half - side * half
    return np.stack([x1, y1, x1 + side, y1 + side], axis=1).astype(np.float32)


def crop_windows(boxes: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer crop windows [K, 4] = (y0, y1, x0, x1) and a validity mask (non-empty).

    ``sizes`` [K, 2] = (h, w) of each box's image. facenet-pytorch's ``pad``:
    truncate, clip x1/y1 to >= 1 and x2/y2 to <= w/h, crop [y1-1, y2) x [x1-1, x2).
    """
    t = np.trunc(boxes[:, :4]).astype(np.int64)
    x0 = np.maximum(t[:, 0], 1) - 1
    y0 = np.maximum(t[:, 1], 1) - 1
    x1 = np.minimum(t[:, 2], sizes[:, 1])
    y1 = np.minimum(t[:, 3], sizes[:, 0])
    valid = (y1 > y0) & (x1 > x0)
    return np.stack([y0, y1, x0, x1], axis=1), valid


def pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
    """Scales at which a 12 px PNet window covers faces from min_face_size up."""
    scale = 12.0 / min_face_size
    min_len = min(height, width) * scale
    scales = []
    while min_len >= 12:
        scales.append(scale)
        scale *= factor
        min_len *= factor
    return scales


# ----------------------------------------------------------------------------- stages


def _stage1(
    images: list[np.ndarray], integrals: list[np.ndarray], pnet: NetFn, p: CascadeParams
) -> tuple[np.ndarray, np.ndarray]:
    """PNet over each pyramid level (same-size images batched). Returns squared boxes, image ids."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(img.shape[:2], []).append(i)
    boxes_l, scores_l, reg_l, inds_l = [], [], [], []
    for (h, w), members in by_shape.items():
        member_ids = np.asarray(members, dtype=np.int64)
        for scale in pyramid_scales(h, w, p.min_face_size, p.factor):
            oh, ow = int(h * scale + 1), int(w * scale + 1)
            level = np.stack([area_resize(integrals[i], oh, ow) for i in members])
            offsets, probs = pnet(level)[:2]
            b, yy, xx = np.nonzero(probs[:, 1] >= np.float32(p.thresholds[0]))
            if b.size == 0:
                continue
            cell = np.stack([xx, yy], axis=1).astype(np.float32)
            s = np.float32(scale)
            q1 = np.floor((np.float32(2) * cell + np.float32(1)) / s)
            q2 = np.floor((np.float32(2) * cell + np.float32(12)) / s)
            boxes = np.concatenate([q1, q2], axis=1).astype(np.float32)
            scores = probs[b, 1, yy, xx]
            reg = offsets[b, :, yy, xx]
            keep = nms(boxes, scores, p.nms_pnet_scale, groups=b)
            boxes_l.append(boxes[keep])
            scores_l.append(scores[keep])
            reg_l.append(reg[keep])
            inds_l.append(member_ids[b[keep]])
    if not boxes_l:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    boxes = np.concatenate(boxes_l)
    scores = np.concatenate(scores_l)
    reg = np.concatenate(reg_l)
    inds = np.concatenate(inds_l)
    keep = nms(boxes, scores, p.nms_pnet_image, groups=inds)
    boxes = square(regress(boxes[keep], reg[keep], plus_one=False))
    return boxes, inds[keep]


def _crops(
    integrals: list[np.ndarray], sizes: np.ndarray, boxes: np.ndarray, inds: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised NCHW crops of the valid boxes, and the validity mask (loop over images only)."""
    windows, valid = crop_windows(boxes, sizes[inds])
    idx = np.flatnonzero(valid)
    out = np.empty((idx.size, 3, size, size), np.float32)
    for img_id in np.unique(inds[idx]):
        sel = inds[idx] == img_id
        out[sel] = area_crops(integrals[img_id], windows[idx[sel]], size)
    return out, valid


def _run_batched(net: NetFn, x: np.ndarray) -> list[np.ndarray]:
    outs = [net(x[i : i + NET_BATCH]) for i in range(0, len(x), NET_BATCH)]
    return [np.concatenate(parts) for parts in zip(*outs)]


def _stage2(
    integrals: list[np.ndarray],
    sizes: np.ndarray,
    boxes: np.ndarray,
    inds: np.ndarray,
    rnet: NetFn,
    p: CascadeParams,
) -> tuple[np.ndarray, np.ndarray]:
    """RNet on 24x24 crops: filter, NMS, regress, square."""
    x, valid = _crops(integrals, sizes, boxes, inds, 24)
    boxes, inds = boxes[valid], inds[valid]
    if not len(boxes):
        return boxes, inds
    offsets, probs = _run_batched(rnet, x)[:2]
    ok = probs[:, 1] > np.float32(p.thresholds[1])
    boxes, inds, scores, offsets = boxes[ok], inds[ok], probs[ok, 1], offsets[ok]
    keep = nms(boxes, scores, p.nms_rnet, groups=inds)
    return square(regress(boxes[keep], offsets[keep], plus_one=True)), inds[keep]


def _stage3(
    integrals: list[np.ndarray],
    sizes: np.ndarray,
    boxes: np.ndarray,
    inds: np.ndarray,
    onet: NetFn,
    p: CascadeParams,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ONet on 48x48 crops: filter, landmarks, regress, min-NMS. Returns boxes, inds, scores, points."""
    x, valid = _crops(integrals, sizes, boxes, inds, 48)
    boxes, inds = boxes[valid], inds[valid]
    if not len(boxes):
        return boxes, inds, np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32)
    offsets, marks, probs = _run_batched(onet, x)[:3]
    ok = probs[:, 1] > np.float32(p.thresholds[2])
    boxes, inds, scores, offsets, marks = boxes[ok], inds[ok], probs[ok, 1], offsets[ok], marks[ok]
    # landmarks are relative to the (squared) input box, in facenet's 1-based layout
    one = np.float32(1)
    w = (boxes[:, 2] - boxes[:, 0] + one)[:, None]
    h = (boxes[:, 3] - boxes[:, 1] + one)[:, None]
    px = w * marks[:, :5] + boxes[:, 0:1] - one
    py = h * marks[:, 5:] + boxes[:, 1:2] - one
    points = np.stack([px, py], axis=2).astype(np.float32)
    boxes = regress(boxes, offsets, plus_one=True)
    keep = nms(boxes, scores, p.nms_onet, groups=inds, mode="min")
    return boxes[keep], inds[keep], scores[keep], points[keep]


def run_cascade(
    images: list[np.ndarray], pnet: NetFn, rnet: NetFn, onet: NetFn, params: CascadeParams
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Detect faces in RGB uint8 images; per image (boxes [K,4], scores [K], landmarks [K,5,2])."""
    integrals = [integral_image(img) for img in images]
    sizes = np.asarray([img.shape[:2] for img in images], dtype=np.int64).reshape(-1, 2)

    boxes, inds = _stage1(images, integrals, pnet, params)
    if len(boxes):
        boxes, inds = _stage2(integrals, sizes, boxes, inds, rnet, params)
    scores, points = np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32)
    if len(boxes):
        boxes, inds, scores, points = _stage3(integrals, sizes, boxes, inds, onet, params)
    else:
        boxes, inds = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)

    results = []
    for i in range(len(images)):
        sel = np.flatnonzero(inds == i)
        sel = sel[np.argsort(-scores[sel], kind="stable")]
        results.append(
            (
                np.ascontiguousarray(boxes[sel], np.float32).reshape(-1, 4),
                np.ascontiguousarray(scores[sel], np.float32).reshape(-1),
                np.ascontiguousarray(points[sel], np.float32).reshape(-1, 5, 2),
            )
        )
    return results
