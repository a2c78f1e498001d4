"""On the real server: generations of different users really share UNet
batches (Triton's own statistics: fewer executions than requests), and a
retrained user is served on the next request (no restart)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from facetron.client.requests import user_headers
from facetron.users import UserRegistry
from user_tokens import grant  # noqa: E402

pytestmark = pytest.mark.triton

SIZE, STEPS = 64, 6


@pytest.fixture(scope="module")
def unet():
    from facetron.diffusion.base_model import load_base_model

    return load_base_model().unet


@pytest.fixture(scope="module")
def two_users(users_dir: Path, unet, tmp_path_factory) -> list[str]:
    from facetron.training.random_lora import write_random_lora

    work = tmp_path_factory.mktemp("batching")
    registry = UserRegistry(users_dir)
    users = ["mix-a", "mix-b"]
    for seed, user in enumerate(users, start=11):
        registry.save_reference_embedding(user, np.ones((1, 128), np.float32))
        grant(registry, user)
        registry.install_lora(user, write_random_lora(work / f"{user}.safetensors", unet, rank=4, alpha=4, seed=seed, std=0.3))
    return users


def _unet_counts(triton) -> tuple[int, int]:
    """(requests, executions) the unet model has served (Triton's statistics)."""
    with grpcclient.InferenceServerClient(triton.grpc_url) as raw:
        stats = raw.get_inference_statistics("unet", headers=triton.admin_headers, as_json=True)["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0)), int(stats.get("execution_count", 0))


def _generate(client, user: str, seed: int, model: str = "portrait_generator") -> np.ndarray:
    inputs = {
        "user_id": np.array([user.encode()], dtype=object),
        "num_images": np.array([1], np.int32),
        "steps": np.array([STEPS], np.int32),
        "seed": np.array([seed], np.int64),
        "height": np.array([SIZE], np.int32),
        "width": np.array([SIZE], np.int32),
    }
    return client.infer(model, inputs, ["images"])["images"]


def test_users_share_unet_batches(client, triton, two_users) -> None:
    """Four generation loops at once (portrait_generator and portrait run 2
    instances each): while the one UNet instance runs a step, the other loops'
    steps queue, so its next execution takes several users' items together."""
    requests0, executions0 = _unet_counts(triton)
    jobs = [(two_users[i % 2], 20 + i, ("portrait_generator", "portrait")[i // 2]) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda j: _generate(client, *j), jobs))
    requests1, executions1 = _unet_counts(triton)
    requests, executions = requests1 - requests0, executions1 - executions0
    assert requests >= 4 * STEPS
    assert executions < requests, f"no mixed batch: {executions} executions for {requests} requests"


def test_a_retrained_user_is_served_on_the_next_request(client, two_users, users_dir, unet, tmp_path) -> None:
    from facetron.training.random_lora import write_random_lora

    user = two_users[0]
    before = _generate(client, user, 5)
    registry = UserRegistry(users_dir)
    registry.install_lora(user, write_random_lora(tmp_path / "new.safetensors", unet, rank=4, alpha=4, seed=99, std=0.3))
    after = _generate(client, user, 5)
    assert np.abs(before.astype(int) - after).mean() > 1.0
    registry.delete(user)
    from facetron.errors import NotFoundError

    with pytest.raises(NotFoundError, match=f"unknown user '{user}'"):
        _generate(client, user, 5)


def test_a_cancelled_generation_stops_between_steps(triton, two_users) -> None:
    """The client gives up (deadline) on a long generation: the server stops
    issuing UNet steps for it instead of running all 150."""
    import time

    from tritonclient.utils import InferenceServerException

    inputs = []
    for name, value in (("user_id", np.array([two_users[1].encode()], dtype=object)),
                        ("steps", np.array([150], np.int32)), ("height", np.array([192], np.int32)),
                        ("width", np.array([192], np.int32))):
        item = grpcclient.InferInput(name, list(value.shape), "BYTES" if value.dtype == object else
                                     {np.dtype(np.int32): "INT32"}[value.dtype])
        item.set_data_from_numpy(value)
        inputs.append(item)
    before, _ = _unet_counts(triton)
    with grpcclient.InferenceServerClient(triton.grpc_url) as raw:
        with pytest.raises(InferenceServerException, match="Deadline"):
            raw.infer("portrait_generator", inputs, client_timeout=1.0, headers=user_headers(two_users[1]))
    deadline = time.monotonic() + 20
    counts = [_unet_counts(triton)[0]]
    while time.monotonic() < deadline:  # poll until the step count stops moving
        time.sleep(0.5)
        counts.append(_unet_counts(triton)[0])
        if counts[-1] == counts[-2] == counts[-3 if len(counts) > 2 else -2]:
            break
    steps_run = counts[-1] - before
    assert counts[-1] == counts[-2], "UNet steps still running after the client gave up"
    assert steps_run < 150, f"all {steps_run} steps ran for a cancelled request"
