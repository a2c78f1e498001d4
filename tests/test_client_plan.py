"""The client's plan, without a server: the retry plan and the failover round
planner (and both front ends following them alike), request building with
the server's rules, error translation, and the client's module layout."""

from __future__ import annotations

import ast
import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from facetron import contract
from facetron.client import grpc_client
from facetron.client import AsyncFacetronClient, AsyncServerPool, FacetronClient, RetryPolicy, ServerPool
from facetron.client.errors import gave_up, is_unavailable, translate_error
from facetron.client.failover import Balancer, FailoverPlan
from facetron.client.requests import (
    detect_op,
    embed_op,
    portrait_op,
    portrait_request,
    select_op,
    select_request,
    tokenize_op,
)
from facetron.client.retry import CallInfo, ClientStats, RetryPlan
from facetron.client.stream import FINAL_OUTPUTS, PROGRESS, STREAM_MODEL
from facetron.errors import STATUS_TABLE, FacetronError, InvalidInputError, NotFoundError, ServerError

CLIENT = Path(__file__).resolve().parent.parent / "client"
STEADY = RetryPolicy(attempts=4, backoff_s=0.1, max_backoff_s=0.3, multiplier=2.0, jitter=0.0)


def unavailable(url: str = "h:1") -> ServerError:
    err = ServerError(f"{url}: connection refused")
    err.url = url  # type: ignore[attr-defined]
    return err


# --- the retry plan --------------------------------------------------------------------


def test_policy_delays_grow_and_are_capped() -> None:
    assert [STEADY.delay(i) for i in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])
    jittery = RetryPolicy(backoff_s=1.0, jitter=0.5)
    assert all(0.5 <= jittery.delay(0) <= 1.0 for _ in range(50))
    with pytest.raises(InvalidInputError, match="retry.attempts"):
        RetryPolicy(attempts=0)


def test_retry_plan_waits_then_gives_up_naming_the_attempts() -> None:
    stats = ClientStats()
    plan = RetryPlan(STEADY, stats)
    waits = [plan.retry_after(unavailable()) for _ in range(3)]
    assert waits == pytest.approx([0.1, 0.2, 0.3]) and plan.attempt == 4
    with pytest.raises(ServerError, match=r"h:1: connection refused \(gave up after 4 attempts\)") as info:
        plan.retry_after(unavailable())
    assert info.value.status == "UNAVAILABLE" and info.value.url == "h:1"
    assert stats.as_dict() == {"calls": 1, "attempts": 4, "failures": 1}


def test_retry_plan_does_not_retry_what_would_fail_again() -> None:
    stats = ClientStats()
    bad = InvalidInputError("images", "expected UINT8")
    with pytest.raises(InvalidInputError) as info:
        RetryPlan(STEADY, stats).retry_after(bad)
    assert info.value is bad
    assert stats.as_dict() == {"calls": 1, "attempts": 1, "failures": 1}


def test_retry_plan_reports_the_answer() -> None:
    stats = ClientStats()
    ticks = iter([10.0, 10.25])
    plan = RetryPlan(STEADY, stats, clock=lambda: next(ticks))
    plan.retry_after(unavailable())
    assert plan.succeeded("h:1") == CallInfo("h:1", 2, 0.25)
    assert stats.as_dict() == {"calls": 1, "attempts": 2, "failures": 0}


def _scripted(answers: list) -> object:
    """An _infer_once that raises/returns the scripted answers in turn (sync and async)."""
    it = iter(answers)

    def next_answer():
        a = next(it)
        if isinstance(a, BaseException):
            raise a
        return a

    return next_answer


@pytest.mark.parametrize(
    "script, expect",
    [
        ([unavailable(), unavailable(), {"y": 1}], ("ok", 3, {"calls": 1, "attempts": 3, "failures": 0})),
        ([unavailable()] * 4, ("gave up after 4 attempts", 4, {"calls": 1, "attempts": 4, "failures": 1})),
        ([NotFoundError("unknown model: 'x'")], ("unknown model", 1, {"calls": 1, "attempts": 1, "failures": 1})),
    ],
)
def test_sync_and_async_clients_follow_the_same_plan(script: list, expect: tuple) -> None:
    policy = RetryPolicy(attempts=4, backoff_s=0.0)
    outcomes = []

    sync = FacetronClient("127.0.0.1:1", retry=policy)
    answer = _scripted(script)
    sync._infer_once = lambda *a: answer()  # type: ignore[method-assign]
    try:
        out, info = sync.infer_with_info("m", {}, ["y"])
        outcomes.append(("ok", info.attempts, sync.stats.as_dict()))
    except FacetronError as err:
        outcomes.append((str(err), sync.stats.attempts, sync.stats.as_dict()))
    finally:
        sync.close()

    async def run_async() -> None:
        client = AsyncFacetronClient("127.0.0.1:1", retry=policy)
        answer = _scripted(script)

        async def once(*a):
            return answer()

        client._infer_once = once  # type: ignore[method-assign]
        try:
            out, info = await client.infer_with_info("m", {}, ["y"])
            outcomes.append(("ok", info.attempts, client.stats.as_dict()))
        except FacetronError as err:
            outcomes.append((str(err), client.stats.attempts, client.stats.as_dict()))
        finally:
            await client.close()

    asyncio.run(run_async())
    for message, attempts, stats in outcomes:
        assert expect[0] in message and (attempts, stats) == expect[1:]


# --- the failover round planner --------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_balancer_rotates_and_reprobes_after_the_cooldown() -> None:
    clock = Clock()
    b = Balancer(["a", "b", "c"], cooldown_s=2.0, clock=clock)
    assert [[(s.url, p) for s, p in b.plan()][0] for _ in range(3)] == [("a", False), ("b", False), ("c", False)]
    b.down(b.states[1], "refused")
    assert [s.url for s, _ in b.plan()] == ["a", "c"]  # b sits out its cool-down
    clock.now += 2.0
    assert [(s.url, p) for s, p in b.plan()] == [("b", True), ("c", False), ("a", False)]  # due probe first
    assert sorted((s.url, p) for s, p in b.plan()) == [("a", False), ("c", False)]  # claimed: no second probe
    for s in b.states:
        b.down(s, "refused")
    assert sorted(s.url for s, _ in b.plan()) == ["a", "b", "c"]  # all down: all tried


def test_failover_plan_rounds_waits_and_final_error() -> None:
    clock = Clock()
    balancer = Balancer(["a", "b"], cooldown_s=60.0, clock=clock)
    stats = ClientStats()
    plan = FailoverPlan(STEADY, balancer, stats)
    seen = []
    for step in plan:
        if step.wait_s:
            seen.append(step.wait_s)
            continue
        seen.append(step.url)
        assert plan.fails_over(step, unavailable(step.url))
    assert seen == ["a", "b", 0.1, "b", "a", 0.2, "a", "b", 0.3, "b", "a"]
    err = plan.exhausted()
    assert err.status == "UNAVAILABLE"
    assert str(err).startswith("no server could serve the call (8 tries over 2 servers): a: connection refused; b:")
    assert stats.as_dict() == {"calls": 1, "attempts": 8, "failures": 1}
    assert {u: s["healthy"] for u, s in balancer.snapshot().items()} == {"a": False, "b": False}


def test_failover_plan_stops_on_errors_every_server_would_repeat_and_on_a_failed_probe() -> None:
    clock = Clock()
    balancer = Balancer(["a", "b"], cooldown_s=1.0, clock=clock)
    stats = ClientStats()
    plan = FailoverPlan(STEADY, balancer, stats)
    step = next(iter(plan))
    assert not plan.fails_over(step, InvalidInputError("images", "bad"))
    assert stats.as_dict() == {"calls": 1, "attempts": 1, "failures": 1} and balancer.snapshot()["a"]["healthy"]

    balancer.down(balancer.states[0], "refused")
    clock.now += 1.0
    plan = FailoverPlan(STEADY, balancer, ClientStats())
    step = next(s for s in plan if s.probe)
    assert not plan.probed(step, False) and plan.tries == 0
    assert balancer.snapshot()["a"]["last_error"] == "not ready when probed"


class FakeClient:
    """A per-server client whose calls answer from a script (sync or async)."""

    def __init__(self, url: str, answers: list, is_async: bool):
        self.url, self.answers, self.is_async, self.calls = url, answers, is_async, 0

    def _answer(self):
        self.calls += 1
        a = self.answers[min(self.calls, len(self.answers)) - 1]
        if isinstance(a, BaseException):
            raise a
        return a, CallInfo(self.url, 1, 0.0)

    def infer_with_info(self, *args, **kwargs):
        if not self.is_async:
            return self._answer()

        async def answer():
            return self._answer()

        return answer()


@pytest.mark.parametrize(
    "a_answers, expect",
    [
        ([unavailable("a")], ("b", 2, {"calls": 1, "attempts": 2, "failures": 0})),
        ([InvalidInputError("images", "bad")], ("images: bad", 1, {"calls": 1, "attempts": 1, "failures": 1})),
    ],
)
def test_sync_and_async_pools_follow_the_same_plan(a_answers: list, expect: tuple) -> None:
    outcomes = []

    def fakes(is_async: bool) -> dict:
        return {"a": FakeClient("a", a_answers, is_async), "b": FakeClient("b", [{"y": 2}], is_async)}

    def outcome(pool, run) -> None:
        try:
            _, info = run()
            outcomes.append((info.server, info.attempts, pool.stats.as_dict()))
        except FacetronError as err:
            outcomes.append((str(err), pool.stats.attempts, pool.stats.as_dict()))

    with ServerPool(["127.0.0.1:1", "127.0.0.1:2"], retry=STEADY) as pool:
        real, pool.clients = pool.clients, fakes(False)
        pool.balancer.states[0].url, pool.balancer.states[1].url = "a", "b"
        outcome(pool, lambda: pool.infer_with_info("m", {}, ["y"]))
        pool.clients = real

    async def run_async() -> None:
        async with AsyncServerPool(["127.0.0.1:1", "127.0.0.1:2"], retry=STEADY) as pool:
            real, pool.clients = pool.clients, fakes(True)
            pool.balancer.states[0].url, pool.balancer.states[1].url = "a", "b"
            result: list = []
            try:
                result.append(await pool.infer_with_info("m", {}, ["y"]))
            except FacetronError as err:
                outcomes.append((str(err), pool.stats.attempts, pool.stats.as_dict()))
            else:
                info = result[0][1]
                outcomes.append((info.server, info.attempts, pool.stats.as_dict()))
            pool.clients = real

    asyncio.run(run_async())
    assert len(outcomes) == 2
    for first, attempts, stats in outcomes:
        assert expect[0] in first and (attempts, stats) == expect[1:]


# --- requests: the server's rules, the contract's names ---------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 100}, "height: must be a multiple of 8 in 32..2048, got 100"),
        ({"width": 4096}, "width: must be a multiple of 8 in 32..2048, got 4096"),
        ({"num_images": 0}, f"num_images: must be 1..{contract.MAX_IMAGES}, got 0"),
        ({"num_images": contract.MAX_IMAGES + 1}, f"num_images: must be 1..{contract.MAX_IMAGES}"),
        ({"steps": 0}, f"steps: must be 1..{contract.MAX_STEPS}, got 0"),
        ({"guidance": math.nan}, "guidance: must be in 0..30, got nan"),
        ({"scheduler": "plms"}, f"scheduler: expected one of {', '.join(contract.SCHEDULERS)}, got 'plms'"),
        ({"strength": 1.5, "template": np.zeros((64, 64, 3), np.uint8)}, "strength: must be in (0, 1], got 1.5"),
        ({"strength": 0.5}, "strength: only applies with a template"),
        ({"num_images": 2, "top_k": 3}, "top_k: must be in 0..num_images (2), got 3"),
        ({"seed": -1}, f"seed: must be in 0..{contract.MAX_SEED}, got -1"),
        ({"steps": "many"}, "steps: expected a number, got 'many'"),
        ({"user_id": "../x"}, "user_id: '../x' is not a valid user id"),
        ({"template": np.zeros((64, 64, 3), np.float32)}, "template: expected UINT8 [H, W, 3]"),
        ({"fusion_strength": 1.5}, "fusion_strength: must be in [0, 1] (0 = no fusion), got 1.5"),
        ({"fuse": False, "fusion_strength": 0.4}, "fuse: false turns fusion off, but fusion_strength is 0.4"),
        ({"cache_interval": 0}, "cache_interval: must be 1..5 (1 = no step caching), got 0"),
        ({"cache_interval": 2.5}, "cache_interval: expected an integer, got 2.5"),
        ({"steps": 20.5}, "steps: expected an integer, got 20.5"),
    ],
)
def test_portrait_request_applies_the_server_rules(kwargs: dict, message: str) -> None:
    kwargs = {"user_id": "demo", **kwargs}
    with pytest.raises(InvalidInputError) as info:
        portrait_request(**kwargs)
    assert str(info.value).startswith(message)


def test_portrait_request_sends_only_what_was_given_with_the_contract_dtypes() -> None:
    assert sorted(portrait_request("demo")) == ["num_images", "user_id"]
    inputs = portrait_request(
        "demo", style="studio", prompt="a {trigger}", num_images=2, top_k=1, steps=20, guidance=6.5, seed=7,
        height=256, width=320, template=np.zeros((64, 64, 3), np.uint8), strength=0.5, negative_prompt="blur",
        scheduler="euler", fuse=True, fusion_strength=0.7, cache_interval=3, paste_template=True,
        control="canny", control_scale=0.8,
    )
    assert set(inputs) <= set(contract.PORTRAIT_INPUT_NAMES)
    for name, dtype in contract.SCALAR_INPUTS.items():
        assert inputs[name].dtype == np.dtype(dtype) and inputs[name].shape == (1,), name
    assert inputs["user_id"].tolist() == [b"demo"] and inputs["scheduler"].tolist() == [b"euler"]


def _ops() -> list:
    images = np.zeros((130, 32, 32, 3), np.uint8)
    return [
        tokenize_op("a photo"),
        detect_op(images, use_shm=True),
        embed_op(np.zeros((3, 150, 150, 3), np.uint8)),
        select_op(images[:2], np.ones(128, np.float32), None, 1),
        select_op(images[:2], None, "demo", 0),
        portrait_op(portrait_request("demo", top_k=1, fuse=False)),
    ]


def test_every_request_speaks_the_contract() -> None:
    for op in _ops():
        for call in op.calls:
            model = contract.BY_NAME[call.model]
            assert set(call.inputs) <= set(model.input_names()), call.model
            assert set(call.outputs) <= set(model.output_names()), call.model
    stream = contract.BY_NAME[STREAM_MODEL]
    assert {PROGRESS, *FINAL_OUTPUTS} <= set(stream.output_names())


def test_detect_splits_at_the_model_limit_and_rejoins() -> None:
    op = detect_op(np.zeros((130, 32, 32, 3), np.uint8))
    assert [len(c.inputs["images"]) for c in op.calls] == [64, 64, 2]

    def answer(n: int, k: int) -> tuple[dict, CallInfo]:
        out = {"boxes": np.ones((n, k, 4), np.float32), "scores": np.ones((n, k), np.float32),
               "landmarks": np.ones((n, k, 5, 2), np.float32), "num_faces": np.full((n, 1), k, np.int32)}
        return out, CallInfo("h:1", 1, 0.0)

    det = op.read([answer(64, 1), answer(64, 3), answer(2, 0)])
    assert len(det) == 130 and det.boxes.shape == (130, 3, 4)
    assert det.num_faces.tolist() == [1] * 64 + [3] * 64 + [0] * 2
    assert det.image(0)[0].shape == (1, 4) and not det.boxes[0, 1:].any()


def test_select_request_rules() -> None:
    images = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(InvalidInputError, match="give exactly one of reference_embedding or user_id"):
        select_request(images)
    with pytest.raises(InvalidInputError, match="top_k: must be >= 0"):
        select_request(images, user_id="demo", top_k=-1)
    with pytest.raises(InvalidInputError, match="user_id: 'a b' is not a valid user id"):
        select_request(images, user_id="a b")
    assert select_request(images[0], np.ones(128))["reference_embedding"].shape == (1, 128)


# --- errors ----------------------------------------------------------------------------


def _exc(message: str, status: str | None) -> InferenceServerException:
    return InferenceServerException(message, status=f"StatusCode.{status}" if status else None)


@pytest.mark.parametrize(
    "message, status, kind, expect_status, text",
    [
        ("images: expected UINT8, got FP32", "INVALID_ARGUMENT", InvalidInputError, "INVALID_ARGUMENT", "images: expected UINT8, got FP32"),
        ("[request id: <id_unknown>] unexpected datatype TYPE_FP32 for input 'images', expecting TYPE_UINT8",
         "INVALID_ARGUMENT", InvalidInputError, "INVALID_ARGUMENT", "images: unexpected datatype TYPE_FP32"),
        ("top_k: must be >= 0 [status: INVALID_ARGUMENT]", "INVALID_ARGUMENT", InvalidInputError, "INVALID_ARGUMENT", "top_k: must be >= 0"),
        ("failed to connect to all addresses", "UNAVAILABLE", ServerError, "UNAVAILABLE", "h:1: failed to connect"),
        ("Request for unknown model: 'x' has no available versions", "NOT_FOUND", ServerError, "UNAVAILABLE", "h:1: Request for"),
        ("face_select: Server not ready", "INTERNAL", ServerError, "UNAVAILABLE", "h:1: face_select: Server not ready"),
        ("Request for unknown model: 'x' is not found", "NOT_FOUND", NotFoundError, "NOT_FOUND", "Request for unknown model"),
        ("Deadline Exceeded", "DEADLINE_EXCEEDED", ServerError, "DEADLINE_EXCEEDED", "h:1: no answer within the timeout of 0.5 s"),
        ("user_id: unknown user 'x' [status: NOT_FOUND]", None, NotFoundError, "NOT_FOUND", "user_id: unknown user 'x'"),
        ("steps: must be 1..150 [status: INVALID_ARGUMENT]", "INTERNAL", InvalidInputError, "INVALID_ARGUMENT", "steps: must be 1..150"),
        ("out of memory", "INTERNAL", FacetronError, "INTERNAL", "out of memory"),
        ("stream closed", None, FacetronError, "INTERNAL", "h:1: stream closed"),
    ],
)
def test_translate_error(message: str, status: str | None, kind: type, expect_status: str, text: str) -> None:
    err = translate_error(_exc(message, status), "h:1", 0.5)
    assert type(err) is kind and err.status == expect_status and err.url == "h:1"  # type: ignore[attr-defined]
    assert str(err).startswith(text), str(err)
    assert "[status:" not in str(err) and "[request id" not in str(err)
    assert is_unavailable(err) == (expect_status == "UNAVAILABLE")


def test_translate_error_uses_the_one_status_table() -> None:
    for status, (kind, _) in STATUS_TABLE.items():
        assert type(translate_error(_exc("x: y", status), "h:1")) is kind


def test_gave_up_notes_attempts_only_for_retried_unavailable() -> None:
    bad = InvalidInputError("x", "y")
    assert gave_up(bad, 3) is bad and gave_up(unavailable(), 1).status == "UNAVAILABLE"
    assert str(gave_up(unavailable(), 3)).endswith("(gave up after 3 attempts)")


# --- layout ----------------------------------------------------------------------------


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(CLIENT.glob("*.py"))}


def test_client_modules_are_small_and_import_at_the_top() -> None:
    for path in sorted(CLIENT.glob("*.py")):
        assert len(path.read_text().splitlines()) <= 400, f"{path.name} is over 400 lines: split it"
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n.lineno for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
                assert not inner, f"client/{name}.py:{inner}: import inside {node.name}() (import at the top)"


def test_client_imports_only_contract_errors_request_and_itself_and_no_torch() -> None:
    """The client builds the same typed request the server parses (facetron.request) and reads
    the operator's per-user tokens (facetron.token_store)."""
    allowed = ("facetron.contract", "facetron.errors", "facetron.request", "facetron.token_store", "facetron.client")
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for t in targets:
                assert t.split(".")[0] not in ("torch", "diffusers", "transformers"), f"client/{name}.py imports {t}"
                if t.startswith("facetron"):
                    assert t.startswith(allowed) and t != "facetron.client", f"client/{name}.py imports {t}"


def _portrait_answer() -> dict[str, np.ndarray]:
    return {"images": np.zeros((1, 8, 8, 3), np.uint8), "similarity": np.array([0.5], np.float32),
            "rank": np.array([0], np.int32), "selected": np.array([0], np.int32),
            "report": np.array([b'{"ok": 1}'], dtype=object)}


def test_progress_goes_over_the_stream_for_one_server_and_is_ignored_by_a_pool(monkeypatch) -> None:
    streamed: list = []

    def fake_stream(url, inputs, on_progress, timeout_s, headers=None):
        streamed.append((url, sorted(inputs), timeout_s))
        on_progress(1, 1)
        return _portrait_answer()

    monkeypatch.setattr(grpc_client, "stream_portrait", fake_stream)
    seen: list = []
    with FacetronClient("127.0.0.1:1") as c:
        result = c.portrait("demo", num_images=1, on_progress=lambda d, t: seen.append((d, t)))
    assert streamed == [("127.0.0.1:1", ["num_images", "user_id"], 600.0)] and seen == [(1, 1)]
    assert result.report == {"ok": 1} and result.timing["server"] == "127.0.0.1:1" and result.timing["attempts"] == 1

    with ServerPool(["127.0.0.1:1"]) as pool:
        pool.infer_with_info = lambda model, inputs, outputs, **kw: (_portrait_answer(), CallInfo("p", 1, 0.0))  # type: ignore[method-assign]
        result = pool.portrait("demo", num_images=1, on_progress=lambda d, t: seen.append((d, t)))
    assert len(streamed) == 1 and result.server == "p"
