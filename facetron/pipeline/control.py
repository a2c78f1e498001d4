"""Template mode's ControlNet conditioning, computed on the server from the fitted template.

``canny``: edges of the template as diffusers' ControlNet canny examples make
them (``cv2.Canny(image, 100, 200)`` on the RGB picture, the one edge map in
all 3 channels); the ``controlnet`` model takes it as its ``control_image_processor``
prepares a picture (``do_normalize=False``): float32 [3, H, W] in [0, 1].
The template is already fitted to the request's height x width, so no resize.

No pose control: FaceChain's inpaint recipes also use an OpenPose ControlNet,
whose conditioning image needs a keypoint model (OpenPose / DWPose), and none
ships in the installed packages (``controlnet_aux``, ``rtmlib`` and the DWPose
wheels download their weights from a model hub at run time, which facetron
never does)."""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from facetron.contract import DEFAULT_CONTROL

#: cv2.Canny's hysteresis thresholds in diffusers' ControlNet canny examples (``low_threshold``, ``high_threshold``)
CANNY_LOW, CANNY_HIGH = 100, 200


def canny_edges(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: the edges (0 or 255) of an RGB uint8 picture, in all 3 channels."""
    edges = cv2.Canny(np.ascontiguousarray(image), CANNY_LOW, CANNY_HIGH)
    return np.repeat(edges[..., None], 3, axis=2)


#: control -> the conditioning picture (uint8 [H, W, 3]) of a fitted template
CONDITIONING = {"canny": canny_edges}


def control_image(control: str, template: np.ndarray) -> np.ndarray:
    """float32 [3, H, W] in [0, 1]: the ``controlnet_cond`` of one item for ``control`` over the fitted
    ``template`` (uint8 [H, W, 3])."""
    picture = CONDITIONING[control](template)
    return np.ascontiguousarray(picture.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


def control_report(control: str, scale: float) -> Optional[dict]:
    """What portrait's report says of the control that ran (None: none)."""
    if control == DEFAULT_CONTROL:
        return None
    return {"control": control, "scale": float(scale), "net": "controlnet (ControlNetModel, guess_mode off)",
            "image": f"cv2.Canny(template, {CANNY_LOW}, {CANNY_HIGH}) in 3 channels, [0, 1], at the output size"}
