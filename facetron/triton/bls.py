"""The server's own models as plain callables over BLS, for the models that
compose them (face_select, portrait_generator, portrait, portrait_stream).

The same callables exist in-process (ONNX Runtime sessions, the local face
models), so the composing logic runs unchanged in tests and benchmarks and
"Triton vs in-process" measures transport alone."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from facetron import contract, metrics
from facetron.diffusion.nets import DiffusionNets
from facetron.errors import FacetronError, NotFoundError
from facetron.triton.backend import bls_chunked, bls_infer, pb


def detect(images: np.ndarray) -> dict[str, np.ndarray]:
    """face_detector: images [N,H,W,3] -> packed detections."""
    return bls_infer(contract.FACE_DETECTOR.name, {"images": np.ascontiguousarray(images)}, contract.DETECTOR_OUTPUTS)


def embed(chips: np.ndarray) -> np.ndarray:
    """face_embedder: aligned chips [M,150,150,3] -> L2-normalised embeddings [M,128]."""
    return bls_chunked(contract.FACE_EMBEDDER.name, {"faces": chips}, "embeddings", contract.FACE_NET_MAX_BATCH)


class MergedModels:
    """The merged ``unet_user_<id>`` models the server uses, least recently
    used first: loading one more than ``max_loaded`` unloads the oldest (each
    is a whole UNet: ~1.7 GB at SD-1.5 shapes). The order is server-wide:
    every model process of one server (each instance of portrait,
    portrait_stream, portrait_generator) records its uses in one ledger file
    (``$FACETRON_MERGED_LEDGER``, which the launcher sets), under an flock;
    without it, each process keeps its own. Another process may unload a
    model this one still uses; its next call then reloads it (``diffusion_nets``).

    Each entry keeps the merge this process last had the server load (or
    confirm loaded): :func:`merge_stamp` of the model's folder. A model
    rewritten since (``export add-user`` again) is loaded again by
    :func:`ensure_merged_unet` on its next use, whichever process loaded the
    old one."""

    def __init__(self, max_loaded: int, ledger: Path | None = None):
        self.max_loaded = max(1, max_loaded)
        self.loaded: OrderedDict[str, tuple] = OrderedDict()
        self.lock = threading.Lock()
        env = os.environ.get(contract.MERGED_LEDGER_ENV)
        self.ledger = ledger if ledger is not None else (Path(env) if env else None)

    def use(self, user_id: str, repository: Path, user_version: str | None = None) -> str:
        name = contract.merged_unet_name(user_id)
        with self.lock:
            confirmed = self.loaded.get(name)
        name, stamp = ensure_merged_unet(user_id, repository, user_version, confirmed)
        with self.lock:
            self.loaded[name] = stamp
            self.loaded.move_to_end(name)
            stale = list(self.loaded)[: max(0, len(self.loaded) - self.max_loaded)]
            if self.ledger is not None:
                stale = self._record_use(name)  # the server-wide order decides
            for old in stale:
                self.loaded.pop(old, None)
        for old in stale:
            try:
                pb().unload_model(model_name=old)
            except Exception:  # noqa: BLE001 - already gone: nothing to free
                pass
        return name

    def _record_use(self, name: str) -> list[str]:
        """``name`` used now in the server-wide ledger ({model: last use, epoch s}); returns the
        models beyond ``max_loaded`` by last use, taken out of the ledger (the caller unloads them)."""
        fd = os.open(self.ledger, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                uses = json.loads(fh.read() or "{}")
            except ValueError:
                uses = {}  # a torn ledger (a process killed mid-write): start over, models reload on use
            uses[name] = time.time()
            order = sorted(uses, key=lambda m: (uses[m], m))
            stale = [m for m in order[: max(0, len(order) - self.max_loaded)] if m != name]
            for old in stale:
                del uses[old]
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps(uses))
        return stale


def merge_stamp(model_dir: Path) -> tuple:
    """Which write of a merged model's folder is on disk: inode, mtime and size
    of its ``config.pbtxt`` and merge record. ``export add-user`` writes a new
    folder each time (renamed into place), so every re-add changes it."""
    stamp = []
    for path in (model_dir / "config.pbtxt", model_dir / contract.VERSION_FOLDER / contract.MERGE_INFO):
        try:
            st = path.stat()
        except OSError:
            stamp.append(None)
        else:
            stamp.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(stamp)


def ensure_merged_unet(user_id: str, repository: Path, user_version: str | None = None,
                       confirmed: tuple | None = None) -> tuple[str, tuple]:
    """Serving mode 1: the user's merged UNet model, loaded on first use
    (the server runs with explicit model control); returns its name and the
    :func:`merge_stamp` it is served from. A model that is not in the
    repository is refused before asking the server: python backend 2.51
    aborts the whole server when a BLS load_model of a missing model fails.
    A merge built from another version of the user (retrained since) is
    refused too: serving it would show the old identity.

    A loaded model is trusted only when ``confirmed`` (the stamp this process
    last had the server load) equals the folder on disk now. Otherwise --
    another process loaded it, or ``export add-user`` rewrote it since --
    ``load_model`` is asked again: Triton compares the folder's timestamps
    with those it loaded from, reloads a model whose files changed (serving
    the old one until the new one is ready) and leaves an unchanged one as
    it is. Any load reads the files on disk, so a loaded model is never older
    than a stamp read before its load: an unchanged stamp means unchanged
    weights, in every process, and for native (TensorRT / ORT) merged models
    too."""
    name = contract.merged_unet_name(user_id)
    missing = (f"user_id: no merged UNet for user {user_id!r} in this repository "
               f"(`facetron export add-user --user {user_id}`)")
    folder = Path(repository) / name
    if not (folder / "config.pbtxt").is_file():
        raise NotFoundError(missing)
    stamp = merge_stamp(folder)  # before reading the record and before any load: a later write changes it
    info = folder / contract.VERSION_FOLDER / contract.MERGE_INFO
    built_from = json.loads(info.read_text()).get("user_version") if info.is_file() else None
    if user_version is not None and built_from is not None and built_from != user_version:
        raise NotFoundError(f"user_id: the merged UNet of user {user_id!r} was built from its version {built_from}; "
                            f"the user is now at {user_version} (`facetron export add-user --user {user_id}`)")
    ready = pb().is_model_ready(model_name=name)
    if not ready or stamp != confirmed:
        try:
            pb().load_model(model_name=name)  # loaded: reloaded if its files changed, else nothing to do
        except Exception as exc:  # noqa: BLE001 - the server's reason, named
            raise NotFoundError(f"{missing}: {exc}") from None
        if not ready:
            metrics.current().merged_model_loaded()
    return name, stamp


def diffusion_nets(info: dict, user_id: str, style: str, identity_mode: str, repository: Path,
                   merged_models: MergedModels, user_version: str | None = None,
                   token: str | None = None, vae: str = contract.DEFAULT_VAE, *,
                   unet_model: str | None = None) -> DiffusionNets:
    """The diffusion nets as BLS calls to the models of the same server.

    ``identity_mode``: ``runtime_lora`` (one ``unet``, the user's LoRA from its
    bank) or ``merged`` (the user's own ``unet_user_<id>`` model, loaded
    through ``merged_models``). The text side is the runtime-LoRA
    ``text_encoder`` in both modes: each row carries ``user_id``, and the
    user's text-encoder LoRA layers (if any; none = the base encoder) apply.
    ``token``: the caller's per-user token, passed on to every net that reads the user.
    ``vae``: the autoencoder models (``contract.VAE_MODELS``: full, or tiny where the repository serves it).
    ``unet_model``: the UNet model the job chose (:func:`facetron.pipeline.job.unet_model`): a runtime-LoRA UNet
    (``unet``, ``unet_fewstep`` for a few-step scheduler or ``unet_inpaint`` in template mode, in merged mode too:
    the user's LoRA from its bank) or the user's ``unet_user_<id>``; None = by ``identity_mode``. Step caching
    is served by ``unet`` and ``unet_fewstep`` only (``unet_inpaint`` has no step-cache graphs)."""
    decoder, encoder = contract.VAE_MODELS[vae]
    if unet_model is None:
        unet_model = contract.merged_unet_name(user_id) if identity_mode == "merged" and user_id else contract.UNET.name
    merged = None
    if unet_model not in contract.LORA_BANK_UNETS:
        if not user_id or unet_model != contract.merged_unet_name(user_id):
            raise ValueError(f"unet_model: {unet_model!r} is neither a runtime-LoRA UNet nor user {user_id!r}'s "
                             "merged UNet")
        merged = merged_models.use(user_id, repository, user_version)
    def unet_call(sample: np.ndarray, t: np.ndarray, hidden: np.ndarray, outputs: str | tuple[str, ...] = "noise_pred",
                  feature: np.ndarray | None = None, residuals: dict[str, np.ndarray] | None = None):
        n = len(sample)
        unet_batch = contract.unet_chunk(sample.shape[2], sample.shape[3], contract.UNET.max_batch_size)
        inputs = {"sample": sample, "timestep": t.reshape(n, 1).astype(np.float32), "encoder_hidden_states": hidden}
        if merged is not None:
            try:
                return bls_chunked(merged, inputs, outputs, unet_batch, token)
            except FacetronError:  # unloaded by another instance's LRU meanwhile: load again, once
                return bls_chunked(merged_models.use(user_id, repository, user_version), inputs, outputs,
                                   unet_batch, token)
        inputs["user_id"] = np.array([[user_id.encode()]] * n, dtype=object)
        inputs["user_version"] = np.array([[(user_version or "").encode()]] * n, dtype=object)  # pinned per request
        inputs["style"] = np.array([[style.encode()]] * n, dtype=object)
        if feature is not None:
            inputs[contract.DEEP_FEATURE] = feature
        inputs.update(residuals or {})  # a ControlNet step: the unet's control graph adds them
        return bls_chunked(unet_model, inputs, outputs, unet_batch, token)

    def unet(sample: np.ndarray, t: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        return unet_call(sample, t, hidden)

    def unet_deep(sample: np.ndarray, t: np.ndarray, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return unet_call(sample, t, hidden, ("noise_pred", contract.DEEP_FEATURE))

    def unet_shallow(sample: np.ndarray, t: np.ndarray, hidden: np.ndarray, feature: np.ndarray) -> np.ndarray:
        return unet_call(sample, t, hidden, feature=feature)

    control = (info.get("controlnet") or {}).get("residuals")  # the residual names, where the repository has one

    def controlnet(sample: np.ndarray, t: np.ndarray, hidden: np.ndarray, cond: np.ndarray,
                   scale: np.ndarray) -> dict[str, np.ndarray]:
        """The ControlNet's residuals, in calls chunked as the unet's (the same samples: the same budget)."""
        n = len(sample)
        inputs = {"sample": sample, "timestep": t.reshape(n, 1).astype(np.float32), "encoder_hidden_states": hidden,
                  "controlnet_cond": cond, "conditioning_scale": scale.reshape(n, 1).astype(np.float32)}
        batch = contract.unet_chunk(sample.shape[2], sample.shape[3], contract.CONTROLNET.max_batch_size)
        return dict(zip(control, bls_chunked(contract.CONTROLNET.name, inputs, tuple(control), batch, token)))

    def unet_control(sample: np.ndarray, t: np.ndarray, hidden: np.ndarray,
                     residuals: dict[str, np.ndarray]) -> np.ndarray:
        return unet_call(sample, t, hidden, residuals=residuals)

    def text_encode(ids: np.ndarray) -> np.ndarray:
        inputs = {"input_ids": ids, "user_id": np.array([[user_id.encode()]] * len(ids), dtype=object),
                  "user_version": np.array([[(user_version or "").encode()]] * len(ids), dtype=object)}
        return bls_chunked(contract.TEXT_ENCODER.name, inputs, "last_hidden_state", contract.TEXT_ENCODER.max_batch_size,
                           token)

    def tokenize(texts: list[str]) -> np.ndarray:
        prompts = np.array([t.encode() for t in texts], dtype=object)
        return bls_infer(contract.TOKENIZER.name, {"prompt": prompts}, ["input_ids"])["input_ids"]

    return DiffusionNets(
        tokenize=tokenize,
        text_encode=text_encode,
        unet=unet,
        # step caching is served by the runtime-LoRA unet (merged per-user models and the inpainting UNet have no
        # step-cache graphs)
        unet_deep=unet_deep if unet_model in contract.RUNTIME_LORA_UNETS else None,
        unet_shallow=unet_shallow if unet_model in contract.RUNTIME_LORA_UNETS else None,
        # the ControlNet: where the repository serves one, with the runtime-LoRA unet (its control graph)
        controlnet=controlnet if control and unet_model == contract.UNET.name else None,
        unet_control=unet_control if control and unet_model == contract.UNET.name else None,
        vae_decode=lambda latent: bls_chunked(decoder.name, {"latent": latent}, "images",
                                              contract.vae_chunk(latent.shape[2], latent.shape[3],
                                                                 decoder.max_batch_size)),
        vae_encode=lambda images: bls_chunked(encoder.name, {"images": images}, "latent",
                                              contract.vae_chunk(images.shape[1] // contract.LATENT_FACTOR,
                                                                 images.shape[2] // contract.LATENT_FACTOR,
                                                                 encoder.max_batch_size)),
        latent_channels=int(info["latent_channels"]),
        latent_factor=int(info["latent_factor"]),
    )
