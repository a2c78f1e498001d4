"""``--cpu-runtime auto`` keeps each net's measured choice per kind of machine and graph architecture
(``facetron.export.runtime_choice_cache``) and reuses it: a second assembly measures nothing (the measuring
function is patched to fail), ``--remeasure`` and a changed key (CPU flags, runtime versions, the graph's
architecture) measure again. Plus the sampled-RSS monitor the assembly reports its memory with.

Tiny default model, each data root a temp folder (the cache lives under it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

NETS = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A data root of this test's own: the kept choices start empty."""
    monkeypatch.setenv("FACETRON_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture()
def counted(monkeypatch):
    """Every call of the measuring function (``runtime_choice.choose_net``), by net name."""
    from facetron.export import runtime_choice

    calls: list[str] = []
    real = runtime_choice.choose_net

    def count(source, name, *args, **kwargs):
        calls.append(name)
        return real(source, name, *args, **kwargs)

    monkeypatch.setattr(runtime_choice, "choose_net", count)
    return calls


def _refuse_measuring(monkeypatch) -> None:
    from facetron.export import runtime_choice

    def refuse(source, name, *args, **kwargs):
        raise AssertionError(f"{name} was measured again")

    monkeypatch.setattr(runtime_choice, "choose_net", refuse)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny default's served nets exported once (a DiffusionSource ready for choose_runtimes)."""
    from facetron.export.diffusion_source import DiffusionSource

    source = DiffusionSource(lora_rank=8)
    source.export(tmp_path_factory.mktemp("export"))
    return source


def test_a_second_assembly_reuses_the_choice_without_measuring(home, counted, tmp_path, monkeypatch) -> None:
    from facetron.export.diffusion_source import DiffusionSource
    from facetron.export.repository import RUNTIME_CHOICE_FILE, assemble_repository
    from facetron.export.runtime_choice_cache import cache_root

    first = assemble_repository("cpu", tmp_path / "r1", models=NETS, diffusion=DiffusionSource(lora_rank=8),
                                cpu_runtime="auto", precision="f32")
    assert sorted(counted) == sorted(NETS)
    measured = json.loads((first / RUNTIME_CHOICE_FILE).read_text())
    kept = sorted(cache_root().glob("*.json"))
    assert len(kept) == len(NETS) and cache_root().is_relative_to(home)
    assert measured["choice_cache"]["reused"] == {} and not any("reused" in e for e in measured["measurements"].values())
    for peak in measured["peak_rss_gib"].values():  # sampled, per stage: export, choose <net>, write, overall
        assert peak > 0.05
    assert {"export", "write", "overall", *(f"choose {n}" for n in NETS)} <= set(measured["peak_rss_gib"])

    _refuse_measuring(monkeypatch)  # a second assembly on this machine: the kept choices, nothing measured
    second = assemble_repository("cpu", tmp_path / "r2", models=NETS, diffusion=DiffusionSource(lora_rank=8),
                                 cpu_runtime="auto", precision="f32")
    reused = json.loads((second / RUNTIME_CHOICE_FILE).read_text())
    assert reused["runtimes"] == measured["runtimes"] and reused["precisions"] == measured["precisions"]
    for net in NETS:
        entry = reused["measurements"][net]
        assert entry["reused"] == measured["measurements"][net]["kept_as"]
        assert json.loads(Path(entry["reused"]).read_text())["key"]["net"] == net
        assert entry["runtimes"] == measured["measurements"][net]["runtimes"]  # the numbers it was chosen by
        config = (second / net / "config.pbtxt").read_text()
        assert f'string_value: "{reused["runtimes"][net]}"' in config
    assert set(reused["choice_cache"]["reused"]) == set(NETS)


def test_remeasure_measures_again(home, counted, exported, tmp_path, capsys) -> None:
    from facetron.cli.main import main
    from facetron.export.runtime_choice_cache import cache_root

    exported.choose_runtimes("f32", nets=["vae_decoder"], repeats=1, budget_s=0.01, cache=cache_root())
    exported.choose_runtimes("f32", nets=["vae_decoder"], repeats=1, budget_s=0.01, cache=cache_root())
    assert counted == ["vae_decoder"]  # kept, then reused
    report = exported.choose_runtimes("f32", nets=["vae_decoder"], repeats=1, budget_s=0.01, cache=cache_root(),
                                      reuse=False)
    assert counted == ["vae_decoder"] * 2 and "reused" not in report["vae_decoder"]
    assert len(list(cache_root().glob("*.json"))) == 1  # the new measurement replaced the kept one
    # the CLI's --remeasure: refused where nothing is measured (a fixed runtime), before any export
    assert main(["export", "repository", "--cpu-runtime", "onnxruntime", "--remeasure", "--out",
                 str(tmp_path / "r")]) == 2
    assert "--remeasure" in capsys.readouterr().err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("change", ["cpu_flags", "versions", "precision"])
def test_a_changed_key_measures_again(change, home, counted, exported, monkeypatch) -> None:
    from facetron.export import runtime_choice, runtime_choice_cache
    from facetron.export.runtime_choice_cache import cache_root

    def choose(precision="f32"):
        return exported.choose_runtimes(precision, nets=["vae_decoder"], repeats=1, budget_s=0.01, cache=cache_root())

    choose()
    assert "reused" in choose()["vae_decoder"] and counted == ["vae_decoder"]
    precision = "f32"
    if change == "cpu_flags":  # another kind of machine: other kernel flags
        real = runtime_choice.cpu_flags
        monkeypatch.setattr(runtime_choice, "cpu_flags", lambda: dict(real(), kernel_flags=["amx_bf16", "amx_tile"]))
    elif change == "versions":  # another openvino
        real_versions = runtime_choice_cache.runtime_versions
        monkeypatch.setattr(runtime_choice_cache, "runtime_versions", lambda: dict(real_versions(), openvino="0.0.1"))
    else:  # another question: bf16 a candidate too
        precision = "auto"
    report = choose(precision)
    assert counted == ["vae_decoder"] * 2 and "reused" not in report["vae_decoder"]
    assert len(list(cache_root().glob("*.json"))) == 2  # kept beside the other key's
    assert "reused" in choose(precision)["vae_decoder"] and counted == ["vae_decoder"] * 2


@pytest.mark.parametrize("flags", [[], pytest.param(["avx512_bf16"], marks=pytest.mark.slow)])  # measured: test_runtimes
def test_auto_measures_bf16_only_where_the_cpu_has_bf16_kernels(flags, exported, monkeypatch) -> None:
    """``precision=auto`` on a CPU without bf16 matrix kernels measures no bf16 candidate (OpenVINO would
    compile f32 and torch's yardstick run emulated) and says why; with them, bf16 is measured and judged."""
    from facetron.export import runtime_choice

    monkeypatch.setattr(runtime_choice, "bf16_fast", lambda: flags)
    entry = runtime_choice.choose_net(exported, "vae_decoder", "auto", repeats=1, budget_s=0.01)
    assert ("openvino_bf16" in entry["runtimes"]) == bool(flags)
    assert ("torch_bf16_rel_l2" in entry) == bool(flags)
    if flags:
        assert "bf16_skipped" not in entry and "eligible" in entry["runtimes"]["openvino_bf16"]
    else:
        assert "amx_bf16, avx512_bf16" in entry["bf16_skipped"]
    assert set(entry["runtimes"]) >= {"onnxruntime", "openvino"} and entry["choice"]


def test_the_key_is_the_graph_architecture_not_its_weights(tmp_path) -> None:
    """Two graphs that differ only in their weights share a signature (another user's fine-tune reuses the
    choice); a different initializer shape, op or input shape does not."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from facetron.export.runtime_choice_cache import graph_signature

    def graph(seed: int, out_features: int = 4, op: str = "Relu", batch: int | str = "batch") -> str:
        w = np.random.default_rng(seed).standard_normal((3, out_features)).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node(op, ["y"], ["z"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, out_features])],
                              [numpy_helper.from_array(w, "w")])
        path = tmp_path / f"{seed}-{out_features}-{op}-{batch}.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return str(path)

    base = graph(0)
    assert graph_signature(base) == graph_signature(graph(1))  # other weights
    for other in (graph(0, out_features=5), graph(0, op="Sigmoid"), graph(0, batch=2)):
        assert graph_signature(other) != graph_signature(base)


def test_the_rss_monitor_sees_a_stage_peak() -> None:
    """A 256 MiB array held inside a stage raises that stage's sampled peak by about its size, not the
    stage before it; a stage nested in another counts for both."""
    from facetron.rss_monitor import OVERALL, RssMonitor

    size = 256 * 2**20
    with RssMonitor(interval_s=0.05) as rss:
        with rss.stage("before"):
            pass
        with rss.stage("outer"), rss.stage("alloc"):  # nested: alloc inside outer
            block = np.ones(size // 8)  # written: resident (sampled at the latest when the stage ends)
    del block
    peaks = rss.peaks_gib()
    assert list(peaks) == ["before", "outer", "alloc", OVERALL]
    assert peaks["alloc"] - peaks["before"] >= 0.9 * size / 2**30
    assert peaks["outer"] >= peaks["alloc"] and peaks[OVERALL] >= peaks["outer"]
    assert set(rss.seconds()) == {"before", "outer", "alloc"}
