"""ServerPool against two real tritonserver replicas: load spreading, no failed
call while a replica is stopped (SIGTERM) or killed (SIGKILL) mid-run, the
stopped replica comes back after its cool-down, and 16 concurrent clients
run without errors or unbounded server memory growth."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from face_photos import photo, square_crop
from facetron.client import AsyncServerPool, FacetronClient, RetryPolicy, ServerPool
from facetron.faces.alignment import align_faces
from facetron.triton.server import TritonServer, free_port
from processes import server_processes

pytestmark = pytest.mark.triton

POLICY = RetryPolicy(attempts=5, backoff_s=0.05, max_backoff_s=0.5)
PROMPT = {"prompt": np.array([b"a photo of a man"], dtype=object)}


@pytest.fixture(scope="module")
def replicas(model_repository: Path, users_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two replicas of the repository (tokenizer + face stack), started in parallel.

    Each is started by a thread that lives until teardown: the launcher sets
    PR_SET_PDEATHSIG, which fires when the *thread* that forked the server ends."""
    logs = tmp_path_factory.mktemp("replicas")
    servers = [
        TritonServer(model_repository, log_path=logs / f"replica{i}.log", env={"FACETRON_USERS_DIR": str(users_dir)})
        for i in range(2)
    ]
    ready = [threading.Event() for _ in servers]
    done = threading.Event()
    errors: list[BaseException] = []

    def keep(s: TritonServer, started: threading.Event) -> None:
        try:
            s.start()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            started.set()
        done.wait()

    threads = [threading.Thread(target=keep, args=(s, e), daemon=True) for s, e in zip(servers, ready)]
    for t in threads:
        t.start()
    for e in ready:
        e.wait()
    try:
        if errors:
            raise errors[0]
        yield servers
    finally:
        for s in servers:
            s.stop()
        done.set()


@pytest.fixture(scope="module")
def select_inputs(replicas) -> dict[str, np.ndarray]:
    """face_select request: two 128² crops of Tom Hanks vs his own embedding."""
    tom = photo("tom_hanks")
    with FacetronClient(replicas[0].grpc_url) as c:
        boxes, _, marks = c.detect(tom).image(0)
        ref = c.embed(align_faces(tom, marks[:1]))
    crops = np.stack([square_crop(tom, boxes[0], m, 128) for m in (0.6, 0.4)])
    return {"images": crops, "reference_embedding": ref, "top_k": np.array([1], np.int32)}


class Load:
    """Threads calling tokenize (and every 8th call face_select) through one pool,
    recording (finish time, server) per call and every exception."""

    def __init__(self, pool: ServerPool, select_inputs: dict[str, np.ndarray], threads: int):
        self.pool, self.select_inputs = pool, select_inputs
        self.calls: list[tuple[float, str]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, seed: int) -> None:
        n = seed
        while not self._stop.is_set():
            n += 1
            try:
                if n % 8 == 0:
                    out, info = self.pool.infer_with_info("face_select", self.select_inputs, ["rank"])
                    assert out["rank"].tolist() in ([0, 1], [1, 0])
                else:
                    out, info = self.pool.infer_with_info("tokenizer", PROMPT, ["input_ids"])
                    assert out["input_ids"][0, 1] == 320
                self.calls.append((time.monotonic(), info.server))
            except BaseException as exc:  # noqa: BLE001 - every failure counts
                self.errors.append(exc)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def test_concurrent_clients_no_errors_bounded_memory(replicas, select_inputs) -> None:
    """16 clients (8 threads with their own pool + 8 asyncio tasks with theirs) for ~10 s."""
    duration = 10.0
    stop_at = time.monotonic() + duration
    counts: Counter[str] = Counter()
    errors: list[BaseException] = []
    urls = [s.grpc_url for s in replicas]
    lock = threading.Lock()

    def thread_client(i: int) -> None:
        with ServerPool(urls, timeout_s=30, retry=POLICY) as pool:
            n = i
            while time.monotonic() < stop_at:
                n += 1
                try:
                    if n % 8 == 0:
                        pool.infer("face_select", select_inputs, ["rank"])
                    else:
                        pool.tokenize(["a photo of a man"])
                    with lock:
                        counts["thread"] += 1
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

    async def task_client(pool: AsyncServerPool, i: int) -> None:
        n = i
        while time.monotonic() < stop_at:
            n += 1
            try:
                if n % 8 == 0:
                    await pool.infer("face_select", select_inputs, ["rank"])
                else:
                    await pool.tokenize(["a photo of a man"])
                counts["task"] += 1
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    async def async_clients() -> None:
        pools = [AsyncServerPool(urls, timeout_s=30, retry=POLICY) for _ in range(8)]
        try:
            await asyncio.gather(*(task_client(p, i) for i, p in enumerate(pools)))
        finally:
            for p in pools:
                await p.close()

    threads = [threading.Thread(target=thread_client, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=lambda: asyncio.run(async_clients())))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration + 60)
    # Memory growth is measured where it can be shown (a minute, a baseline after
    # warm-up, one sample a second): `facetron bench soak`, not in this short test.
    print(f"\n16 clients, {duration:.0f} s: {sum(counts.values())} calls ({dict(counts)}), {len(errors)} errors")
    assert not errors, errors[:3]
    assert counts["thread"] > 50 and counts["task"] > 50


def test_failover_when_a_replica_stops_and_recovery(replicas, select_inputs) -> None:
    a, b = replicas
    # A third address where nothing listens yet: the stopped replica restarts
    # there (its old ports linger in TIME_WAIT), and the pool must take it into
    # rotation once its cool-down ends and a probe finds it ready.
    spare_port = free_port()
    spare = f"127.0.0.1:{spare_port}"
    with ServerPool([a.grpc_url, b.grpc_url, spare], timeout_s=30, retry=POLICY, cooldown_s=1.0) as pool:
        old_a = a.grpc_url
        with Load(pool, select_inputs, threads=6) as load:
            time.sleep(1.5)
            a.stop()  # SIGTERM: Triton unloads models, then exits; in-flight calls finish
            stopped = time.monotonic()
            time.sleep(2.0)
        stats = pool.server_stats()
        per_server = Counter(url for _, url in load.calls)
        print(f"\nSIGTERM failover: {len(load.calls)} calls, {len(load.errors)} failed, served {dict(per_server)}")
        assert not load.errors, load.errors[:3]
        assert per_server[old_a] > 0 and per_server[b.grpc_url] > 0 and per_server[spare] == 0
        after = [url for t, url in load.calls if t > stopped + 0.1]
        assert after and set(after) == {b.grpc_url}, "the surviving replica served the rest"
        assert not stats[old_a]["healthy"] and not stats[spare]["healthy"]

        a.grpc_port, a.http_port, a.metrics_port = spare_port, None, None
        a.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15 and not pool.server_stats()[spare]["served"]:
            pool.tokenize(["back?"])
            time.sleep(0.05)
        print(f"restarted replica served again {time.monotonic() - t0:.2f} s after it was ready")
        assert pool.server_stats()[spare]["served"] > 0, "restarted replica not taken back into rotation"


def test_async_failover_when_a_replica_is_killed(replicas, select_inputs) -> None:
    a, b = replicas
    assert a.is_running() and b.is_running()

    async def main() -> tuple[list[tuple[float, str]], list[BaseException], float]:
        calls: list[tuple[float, str]] = []
        errors: list[BaseException] = []
        stop = asyncio.Event()
        async with AsyncServerPool([a.grpc_url, b.grpc_url], timeout_s=30, retry=POLICY) as pool:

            async def worker(i: int) -> None:
                n = i
                while not stop.is_set():
                    n += 1
                    try:
                        if n % 8 == 0:
                            _, info = await pool.infer_with_info("face_select", select_inputs, ["rank"])
                        else:
                            _, info = await pool.infer_with_info("tokenizer", PROMPT, ["input_ids"])
                        calls.append((time.monotonic(), info.server))
                    except BaseException as exc:  # noqa: BLE001
                        errors.append(exc)

            tasks = [asyncio.create_task(worker(i)) for i in range(8)]
            await asyncio.sleep(1.5)
            os.killpg(b.process.pid, signal.SIGKILL)  # no goodbye: connections reset
            killed = time.monotonic()
            await asyncio.sleep(2.0)
            stop.set()
            await asyncio.gather(*tasks)
        return calls, errors, killed

    calls, errors, killed = asyncio.run(main())
    b.stop()  # reap
    per_server = Counter(url for _, url in calls)
    print(f"\nSIGKILL failover (asyncio): {len(calls)} calls, {len(errors)} failed, served {dict(per_server)}")
    assert not errors, errors[:3]
    assert per_server[a.grpc_url] > 0 and per_server[b.grpc_url] > 0
    after = [url for t, url in calls if t > killed + 0.1]
    assert after and set(after) == {a.grpc_url}
