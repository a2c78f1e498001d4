"""The served tokenizer over real gRPC (tritonserver on 127.0.0.1)."""

from __future__ import annotations

import numpy as np
import pytest

from facetron.diffusion.clip_tokenizer import ClipTokenizer
from facetron.errors import InvalidInputError

pytestmark = pytest.mark.triton

PROMPTS = ["a photo of a man", "", "東京 café 😀", "portrait " * 100, "it's <|endoftext|> ok"]


def test_server_is_ready(client, triton) -> None:
    assert client.is_ready()
    assert client.model_ready("tokenizer")
    assert triton.host == "127.0.0.1"


def test_tokenize_over_grpc_matches_in_process(client) -> None:
    ids = client.tokenize(PROMPTS)
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, ClipTokenizer()(PROMPTS))


def test_invalid_utf8_is_invalid_argument(client) -> None:
    bad = np.array([b"fine", b"\xff\xfe broken"], dtype=object)
    with pytest.raises(InvalidInputError, match=r"prompt\[1\]: not valid UTF-8"):
        client.infer("tokenizer", {"prompt": bad}, ["input_ids"])
    assert client.is_ready()


def test_wrong_shape_is_rejected(client) -> None:
    bad = np.array([[b"a"], [b"b"]], dtype=object)  # [2,1] where [N] is expected
    with pytest.raises(InvalidInputError, match="prompt"):
        client.infer("tokenizer", {"prompt": bad}, ["input_ids"])
    assert client.is_ready()


def test_wrong_dtype_is_rejected(client) -> None:
    with pytest.raises(InvalidInputError, match="prompt"):
        client.infer("tokenizer", {"prompt": np.zeros(3, np.int32)}, ["input_ids"])


def test_empty_batch_is_rejected(client) -> None:
    with pytest.raises(InvalidInputError, match="at least one prompt"):
        client.infer("tokenizer", {"prompt": np.array([], dtype=object)}, ["input_ids"])


def test_unknown_model_is_not_found(client) -> None:
    from facetron.errors import NotFoundError

    with pytest.raises(NotFoundError):
        client.infer("no_such_model", {"prompt": np.array([b"a"], dtype=object)}, ["input_ids"])
