"""The layers hold: read from the source's own imports (function bodies too).

core (``facetron/`` minus ``cli/``) imports none of training, export, client,
benchmarks, cli; the client imports only the contract and errors from core;
served models import core only; no import cycles; the runtime-LoRA ``unet``
model loads no torch. Each rule is also shown failing on an injected module,
so a rule that can no longer fire is caught."""

from __future__ import annotations

import subprocess
import sys

import import_graph as g
import pytest


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return g.module_sources()


@pytest.fixture(scope="module")
def imports(sources) -> list[g.Import]:
    return g.graph(sources)


def test_the_graph_sees_every_part(sources, imports) -> None:
    assert {g.part_of(m) for m in sources} == {"core", *g.PARTS}
    assert any(i.in_function for i in imports)  # deferred imports are read too
    assert len(sources) > 80


def test_layers_hold(imports) -> None:
    assert g.layer_violations(imports) == []


def test_served_models_import_core_only(sources) -> None:
    served = g.served_model_sources()
    assert len(served) >= 12
    assert g.served_model_violations(served, sources) == []


def test_no_import_cycles(imports) -> None:
    assert g.cycles(imports) == [], "import cycles (deferred imports count)"


@pytest.mark.parametrize("module", ["facetron.serving.unet", "facetron.serving.text_encoder"])
def test_runtime_lora_nets_load_no_torch(imports, module) -> None:
    """The runtime-LoRA ``unet`` and ``text_encoder`` models (LoRA files read with numpy)."""
    loaded = g.closure(module, imports)
    heavy = [(i.source, i.target) for i in imports if i.source in loaded and i.target in g.TORCH_STACK]
    assert heavy == []
    code = f"import sys, {module}; " + "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))"
    out = subprocess.run([sys.executable, "-c", code % (g.TORCH_STACK,)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "name, text, rule",
    [
        ("facetron.serving.evil", "def f():\n    from facetron.export import merge\n", "core may not import facetron.export"),
        ("facetron.faces.evil", "import facetron.training.train_lora\n", "core may not import facetron.training"),
        ("facetron.client.evil", "from facetron.users import UserRegistry\n", "the client imports only"),
        ("facetron.training.evil", "from facetron.cli import main\n", "may not import facetron.cli"),
    ],
)
def test_a_forbidden_import_is_caught(sources, name, text, rule) -> None:
    extra = {**sources, name: text}
    found = g.layer_violations(g.graph(extra))
    assert any(name in v and rule in v for v in found), found


def test_a_hidden_cycle_is_caught(sources) -> None:
    extra = {**sources, "facetron.contract": sources["facetron.contract"] + "\ndef f():\n    import facetron.triton.backend\n"}
    assert any("facetron.contract" in c for c in g.cycles(g.graph(extra)))


def test_a_served_model_reaching_into_export_is_caught(sources) -> None:
    bad = {"model_repository/evil": "from facetron.export.merge import merge_loras\n"}
    assert g.served_model_violations(bad, sources)
