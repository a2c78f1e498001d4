"""The measured runtime choice of a net, kept per kind of machine and net architecture.

Measuring a net's runtimes (:func:`facetron.export.runtime_choice.choose_net`)
takes minutes at SD-1.5 shapes and compiles the UNet in OpenVINO twice; the
answer depends on the machine and the graph's shape, not on the weights. So
each measured report entry is stored under
``<data root>/cache/runtime_choice/<key>.json`` (:func:`cache_root`,
written atomically) and a later assembly whose key is the same reuses it.

The key (:func:`choice_key`) holds everything the choice depends on:

1. the machine: the CPU model, its kernel-deciding flags
   (:func:`facetron.export.runtime_choice.cpu_flags`), its logical CPU count
   and the threads a net runs on;
2. the software: the versions of onnxruntime, openvino and torch (torch's
   bf16 is the yardstick of a bf16 candidate);
3. the question: the precision mode (``f32`` | ``auto``), the served net's
   name and the rule's constants (margin, bf16 factor, image-check steps,
   and whether a bf16 candidate is measured: ``auto`` on a CPU with bf16
   kernels);
4. the graph's architecture (:func:`graph_signature`): its inputs' and
   outputs' names, types and shapes, and a hash of its initializers' shapes
   and types and its nodes' op types — not the weights, so another user's
   fine-tune of the same architecture reuses the choice.

A changed key is another file: nothing stale is read. The stored file
repeats its key, and a file whose key differs (a hash collision, a hand
edit) is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from facetron.atomic import atomic_write_json
from facetron.paths import data_root

#: bump when the stored entry's meaning changes: every older entry stops matching
CACHE_FORMAT = 1


def cache_root() -> Path:
    """Where measured choices are kept: ``<data root>/cache/runtime_choice/`` (read at each call, not created)."""
    return data_root() / "cache" / "runtime_choice"


def graph_signature(onnx_path: str | Path) -> dict:
    """The architecture of ONNX graph ``onnx_path``, not its weights: inputs and outputs (name, element
    type, dims: numbers or symbolic names), the opsets, and a sha256 over the initializers' (type, shape)
    and the nodes' (domain, op type) in graph order. The external weight file is never read."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph

    def tensors(values) -> list:
        out = []
        for v in values:
            t = v.type.tensor_type
            out.append([v.name, int(t.elem_type),
                        [d.dim_param or int(d.dim_value) if d.HasField("dim_value") or d.dim_param else None
                         for d in t.shape.dim]])
        return out

    h = hashlib.sha256()
    for init in graph.initializer:
        h.update(f"{init.data_type}:{','.join(map(str, init.dims))};".encode())
    h.update(b"|")
    for node in graph.node:
        h.update(f"{node.domain}:{node.op_type};".encode())
    signature = {"inputs": tensors(graph.input), "outputs": tensors(graph.output),
                 "opsets": sorted([o.domain, int(o.version)] for o in model.opset_import),
                 "initializers": len(graph.initializer), "nodes": len(graph.node), "architecture": h.hexdigest()}
    del model, graph
    return signature


def runtime_versions() -> dict:
    """The versions of the runtimes measured and of torch (the bf16 yardstick); None where one does not import."""
    versions = {}
    for name in ("onnxruntime", "openvino", "torch"):
        try:
            versions[name] = str(__import__(name).__version__)
        except Exception:  # noqa: BLE001 - a missing runtime is part of the key, not an error
            versions[name] = None
    return versions


def choice_key(name: str, onnx_path: str | Path, precision: str, threads: int | None, rule: dict, cpu: dict) -> dict:
    """What net ``name``'s measured choice depends on (module docstring); ``rule``: the choice's constants;
    ``cpu``: the CPU model and kernel flags (:func:`facetron.export.runtime_choice.cpu_flags`)."""
    return {"format": CACHE_FORMAT, "net": name, "cpu": dict(cpu, logical_cpus=os.cpu_count()),
            "threads": threads, "precision": precision, "versions": runtime_versions(), "rule": rule,
            "graph": graph_signature(onnx_path)}


def key_file(key: dict, root: Path | None = None) -> Path:
    """The cache file of ``key``: ``<root>/<net>-<sha256 of the key, 20 hex>.json``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return (root if root is not None else cache_root()) / f"{key['net']}-{digest}.json"


def load_choice(key: dict, root: Path | None = None) -> tuple[dict, Path] | None:
    """(the stored report entry, its file) for ``key``, or None (no file, unreadable, or another key's)."""
    path = key_file(key, root)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key or not isinstance(stored.get("entry"), dict):
        return None
    return stored["entry"], path


def store_choice(key: dict, entry: dict, root: Path | None = None) -> Path:
    """Keep ``entry`` (a measured report entry) under ``key``, atomically; returns its file."""
    path = key_file(key, root)
    atomic_write_json(path, {"key": key, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "entry": entry})
    return path
