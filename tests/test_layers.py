"""The layers hold: read from the source's own imports (function bodies too)
and the subprocesses that run facetron (``-m facetron.X``, the ``facetron``
script), which count as imports.

- core (``facetron/`` minus ``cli/``) imports none of training, export, client,
  benchmarks, web, cli; the client imports only the contract and errors from
  core, the web app those and image io;
- ``facetron.serving.<model>`` is imported only by its
  ``model_repository/<model>/1/model.py`` (and tests) and imports no other
  serving module: shared code lives in ``facetron.pipeline`` or ``facetron.triton``;
- ``facetron.pipeline`` imports neither ``facetron.triton`` nor
  ``facetron.serving``: it runs the same in Triton and in-process;
- ``facetron.triton`` imports no ``facetron.serving``;
- outside core and the CLI only ``facetron.triton.server`` (the launcher) is
  imported from ``facetron.triton``, never the python-backend glue;
- only the CLI and the web app run the CLI as a subprocess (the web app so that
  torch never loads in its process); benchmarks and the rest call the library;
- served ``model.py`` files import core only; no import cycles; the runtime-LoRA
  ``unet`` and ``text_encoder`` models load no torch.

Each rule is also shown failing on an injected module, so a rule that can no
longer fire is caught. The rules and their reasons: tests/import_graph.py."""

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
        ("facetron.serving.evil", "from facetron.serving.unet import UnetModel\n",
         "a serving module imports no other facetron.serving module"),
        ("facetron.benchmarks.evil", "from facetron.serving.unet import UnetModel\n",
         "is imported only by model_repository/<model>/1/model.py"),
        ("facetron.pipeline.evil", "from facetron.triton import bls\n", "the processing library imports neither"),
        ("facetron.triton.evil", "def f():\n    import facetron.serving.unet\n", "facetron.triton imports no facetron.serving"),
        ("facetron.export.evil", "from facetron.triton.backend import read_params\n",
         "only facetron.triton.server (the tritonserver launcher)"),
        ("facetron.benchmarks.evil", 'import subprocess, sys\nsubprocess.run([sys.executable, "-m", "facetron.cli", "demo"])\n',
         "facetron.benchmarks may not run facetron.cli"),
        ("facetron.export.evil", 'import shutil, subprocess\nsubprocess.run([shutil.which("facetron"), "demo"])\n',
         "facetron.export may not run facetron.cli"),
        ("facetron.faces.evil", 'import os\nos.system("python -m facetron.training.train_lora")\n',
         "core may not run facetron.training"),
    ],
)
def test_a_forbidden_import_is_caught(sources, name, text, rule) -> None:
    extra = {**sources, name: text}
    found = g.layer_violations(g.graph(extra))
    assert any(name in v and rule in v for v in found), found


def test_the_web_app_may_run_the_cli_but_not_import_it(sources, imports) -> None:
    """web/stages.py runs prepare and training as the operator's CLI in a child process (torch never loads in
    the web process): that subprocess is seen, and allowed; importing the CLI is not."""
    spawned = {i.source for i in imports if i.subprocess and i.target == "facetron.cli"}
    assert "facetron.web.stages" in spawned
    extra = {**sources, "facetron.web.evil": "from facetron.cli.train import add_parser\n"}
    assert any("facetron.web.evil" in v and "may not import facetron.cli" in v
               for v in g.layer_violations(g.graph(extra)))


def test_a_subprocess_is_no_import_cycle(sources) -> None:
    """A child process loads nothing into its parent: the CLI (which loads the contract) run by the contract
    makes no cycle and puts nothing of the CLI into the contract's closure (the layer rule still fires)."""
    extra = {**sources, "facetron.contract": sources["facetron.contract"] + '\nCMD = ["facetron", "demo"]\n'}
    imports = g.graph(extra)
    assert "facetron.contract" in g.closure("facetron.cli.main", imports)
    assert g.cycles(imports) == []
    assert not any(m.startswith("facetron.cli") for m in g.closure("facetron.contract", imports))
    assert any("facetron.contract" in v and "core may not run facetron.cli" in v for v in g.layer_violations(imports))


def test_a_hidden_cycle_is_caught(sources) -> None:
    extra = {**sources, "facetron.contract": sources["facetron.contract"] + "\ndef f():\n    import facetron.triton.backend\n"}
    assert any("facetron.contract" in c for c in g.cycles(g.graph(extra)))


def test_a_served_model_reaching_into_export_is_caught(sources) -> None:
    bad = {"model_repository/evil": "from facetron.export.merge import merge_loras\n"}
    assert g.served_model_violations(bad, sources)


def test_a_served_model_importing_another_models_module_is_caught(sources) -> None:
    bad = {"model_repository/face_select": "from facetron.serving.unet import UnetModel as TritonPythonModel\n"}
    found = g.served_model_violations(bad, sources)
    assert any("only its own module facetron.serving.face_select" in v for v in found), found
