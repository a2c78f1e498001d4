"""The server's own models as plain callables over BLS, for the models that
compose them (face_select, portrait_generator, portrait, portrait_stream).

The same callables exist in-process (ONNX Runtime sessions, the local face
models), so the composing logic runs unchanged in tests and benchmarks and
"Triton vs in-process" measures transport alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facetron import contract
from facetron.errors import NotFoundError
from facetron.serving.backend import bls_chunked, bls_infer, pb
from facetron.diffusion.nets import DiffusionNets


def detect(images: np.ndarray) -> dict[str, np.ndarray]:
    """face_detector: images [N,H,W,3] -> packed detections."""
    return bls_infer(contract.FACE_DETECTOR.name, {"images": np.ascontiguousarray(images)}, contract.DETECTOR_OUTPUTS)


def embed(chips: np.ndarray) -> np.ndarray:
    """face_embedder: aligned chips [M,150,150,3] -> L2-normalised embeddings [M,128]."""
    return bls_chunked(contract.FACE_EMBEDDER.name, {"faces": chips}, "embeddings", contract.FACE_NET_MAX_BATCH)


def ensure_merged_unet(user_id: str, repository: Path) -> str:
    """Serving mode 1: the user's merged UNet model, loaded on first use
    (the server runs with explicit model control). A model that is not in
    the repository is refused before asking the server: python backend 2.51
    aborts the whole server when a BLS load_model of a missing model fails."""
    name = contract.merged_unet_name(user_id)
    missing = (f"user_id: no merged UNet for user {user_id!r} in this repository "
               f"(`facetron export add-user --user {user_id}`)")
    if not (Path(repository) / name / "config.pbtxt").is_file():
        raise NotFoundError(missing)
    if not pb().is_model_ready(model_name=name):
        try:
            pb().load_model(model_name=name)
        except Exception as exc:  # noqa: BLE001 - the server's reason, named
            raise NotFoundError(f"{missing}: {exc}") from None
    return name


def diffusion_nets(info: dict, user_id: str, style: str, identity_mode: str, repository: Path) -> DiffusionNets:
    """The diffusion nets as BLS calls to the models of the same server.

    ``identity_mode``: ``runtime_lora`` (one ``unet``, the user's LoRA from its
    bank) or ``merged`` (the user's own ``unet_user_<id>`` model)."""
    merged = ensure_merged_unet(user_id, repository) if identity_mode == "merged" and user_id else None
    unet_batch = contract.UNET.max_batch_size

    def unet(sample: np.ndarray, t: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        n = len(sample)
        inputs = {"sample": sample, "timestep": t.reshape(n, 1).astype(np.float32), "encoder_hidden_states": hidden}
        if merged is not None:
            return bls_chunked(merged, inputs, "noise_pred", unet_batch)
        inputs["user_id"] = np.array([[user_id.encode()]] * n, dtype=object)
        inputs["style"] = np.array([[style.encode()]] * n, dtype=object)
        return bls_chunked(contract.UNET.name, inputs, "noise_pred", unet_batch)

    def tokenize(texts: list[str]) -> np.ndarray:
        prompts = np.array([t.encode() for t in texts], dtype=object)
        return bls_infer(contract.TOKENIZER.name, {"prompt": prompts}, ["input_ids"])["input_ids"]

    return DiffusionNets(
        tokenize=tokenize,
        text_encode=lambda ids: bls_chunked(contract.TEXT_ENCODER.name, {"input_ids": ids}, "last_hidden_state",
                                            contract.TEXT_ENCODER.max_batch_size),
        unet=unet,
        vae_decode=lambda latent: bls_chunked(contract.VAE_DECODER.name, {"latent": latent}, "images",
                                              contract.VAE_DECODER.max_batch_size),
        vae_encode=lambda images: bls_chunked(contract.VAE_ENCODER.name, {"images": images}, "latent",
                                              contract.VAE_ENCODER.max_batch_size),
        latent_channels=int(info["latent_channels"]),
        latent_factor=int(info["latent_factor"]),
    )
