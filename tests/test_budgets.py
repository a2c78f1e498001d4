"""Every served net bounded, even when a stranger calls it directly (issue 21, item 1).

Over raw gRPC against the session server: each net model gets one request just
over each of its budgets (contract: latent cells and sides per call, pixels per
request, batch sizes, prompt bytes); each must answer INVALID_ARGUMENT naming
the input and the limit, in well under a second (the check runs before any
work), and the server stays live. The optional nets too (the session
repository serves them, tests/conftest.py): ``controlnet`` and ``unet_fewstep``
get the unet's requests (the controlnet's with a conditioning image that fits
each sample), ``vae_decoder_tiny`` / ``vae_encoder_tiny`` the full VAEs'. The
tokenizer's worst case within its limits answers in under 2 s, in-process and
over gRPC. In-process: the tokenizer's
heap BPE against the reference merge loop, and a dynamic batch over a budget
split into runs within it."""

from __future__ import annotations

import random
import string
import time

import numpy as np
import pytest

from facetron import contract
from facetron.diffusion.clip_tokenizer import ClipTokenizer
from facetron.pipeline.net_io import NET_BUDGETS, NET_CHECKS
from facetron.triton.batching import within_budget

#: an over-budget request is refused before any work: the bound covers the transfer of the largest one
#: (a 50 MB image request, the smallest that can hold more than MAX_REQUEST_PIXELS) on a busy 2-core machine
REFUSE_S = 1.0
#: the tokenizer's worst case within its limits
TOKENIZE_S = 2.0

C = contract
HIDDEN = 32  # the tiny default model's text hidden size (the sample is checked first: any width is refused)


def _zeros(shape, dtype=np.float32) -> np.ndarray:
    return np.zeros(shape, dtype)


def _unet(sample_shape) -> dict[str, np.ndarray]:
    n = sample_shape[0]
    return {"sample": _zeros(sample_shape), "timestep": np.ones((n, 1), np.float32),
            "encoder_hidden_states": _zeros((n, C.TOKENS, HIDDEN))}


def _controlnet(sample_shape) -> dict[str, np.ndarray]:
    """The unet's request + the conditioning image at 8 px per latent cell of the sample (consistent with it: only
    the sample's budget is broken) and one scale per item."""
    n, _, h, w = sample_shape
    return {**_unet(sample_shape), "controlnet_cond": _zeros((n, 3, C.LATENT_FACTOR * h, C.LATENT_FACTOR * w)),
            "conditioning_scale": np.ones((n, 1), np.float32)}


def _prompts(*values: bytes) -> np.ndarray:
    return np.array(values, dtype=object)


_SIDE = C.MAX_LATENT_SIDE + 1
_REF = np.ones((1, C.EMBEDDING_DIM), np.float32)
#: (model, input, the limit its message must name, feed): one request just over each budget
OVER = [
    ("unet", "sample", str(C.MAX_LATENT_SIDE), lambda: _unet((1, C.LATENT_CHANNELS, _SIDE, C.MIN_LATENT_SIDE))),
    ("unet", "sample", str(C.UNET_MAX_BATCH_CELLS), lambda: _unet((1, C.LATENT_CHANNELS, 182, 181))),
    ("unet", "sample", str(C.UNET_MAX_BATCH_CELLS), lambda: _unet((3, C.LATENT_CHANNELS, 105, 105))),
    ("unet", "batch-size", str(C.UNET.max_batch_size), lambda: _unet((C.UNET.max_batch_size + 1, C.LATENT_CHANNELS, 4, 4))),
    ("unet", "sample", f"{C.LATENT_CHANNELS}", lambda: _unet((1, C.LATENT_CHANNELS + 1, 8, 8))),  # fixed config dim
    ("text_encoder", "batch-size", str(C.TEXT_ENCODER.max_batch_size),
     lambda: {"input_ids": np.full((C.TEXT_ENCODER.max_batch_size + 1, C.TOKENS), 49407, np.int32)}),
    ("text_encoder", "input_ids", str(C.TOKENS), lambda: {"input_ids": np.full((1, C.TOKENS + 1), 49407, np.int32)}),
    ("vae_decoder", "latent", str(C.MAX_LATENT_SIDE), lambda: {"latent": _zeros((1, C.LATENT_CHANNELS, 8, _SIDE))}),
    ("vae_decoder", "latent", str(C.VAE_MAX_ITEM_CELLS), lambda: {"latent": _zeros((1, C.LATENT_CHANNELS, 128, 129))}),
    ("vae_decoder", "latent", str(C.VAE_MAX_BATCH_CELLS), lambda: {"latent": _zeros((3, C.LATENT_CHANNELS, 128, 128))}),
    ("vae_decoder", "batch-size", str(C.VAE_DECODER.max_batch_size),
     lambda: {"latent": _zeros((C.VAE_DECODER.max_batch_size + 1, C.LATENT_CHANNELS, 4, 4))}),
    ("vae_encoder", "images", str(C.MAX_SIDE), lambda: {"images": _zeros((1, C.MAX_SIDE + 8, 32, 3), np.uint8)}),
    ("vae_encoder", "images", str(C.VAE_MAX_ITEM_CELLS), lambda: {"images": _zeros((1, 1024, 1032, 3), np.uint8)}),
    ("vae_encoder", "images", str(C.VAE_MAX_BATCH_CELLS), lambda: {"images": _zeros((3, 1024, 1024, 3), np.uint8)}),
    ("vae_encoder", "batch-size", str(C.VAE_ENCODER.max_batch_size),
     lambda: {"images": _zeros((C.VAE_ENCODER.max_batch_size + 1, 32, 32, 3), np.uint8)}),
    ("face_detector", "images", str(C.MAX_REQUEST_PIXELS), lambda: {"images": _zeros((2, 4096, 2049, 3), np.uint8)}),
    ("face_detector", "images", str(C.MAX_IMAGE_SIDE), lambda: {"images": _zeros((1, C.MAX_IMAGE_SIDE + 1, 16, 3), np.uint8)}),
    ("face_detector", "batch-size", str(C.FACE_NET_MAX_BATCH),
     lambda: {"images": _zeros((C.FACE_NET_MAX_BATCH + 1, 16, 16, 3), np.uint8)}),
    ("face_embedder", "batch-size", str(C.FACE_NET_MAX_BATCH),
     lambda: {"faces": _zeros((C.FACE_NET_MAX_BATCH + 1, C.CHIP_SIZE, C.CHIP_SIZE, 3), np.uint8)}),
    ("face_select", "images", str(C.MAX_REQUEST_PIXELS),
     lambda: {"images": _zeros((2, 4096, 2049, 3), np.uint8), "reference_embedding": _REF}),
    ("face_select", "images", str(C.MAX_IMAGE_SIDE),
     lambda: {"images": _zeros((1, C.MAX_IMAGE_SIDE + 1, 16, 3), np.uint8), "reference_embedding": _REF}),
    ("face_select", "images", str(C.MAX_CANDIDATES),
     lambda: {"images": _zeros((C.MAX_CANDIDATES + 1, 16, 16, 3), np.uint8), "reference_embedding": _REF}),
    ("controlnet", "sample", str(C.MAX_LATENT_SIDE),
     lambda: _controlnet((1, C.LATENT_CHANNELS, _SIDE, C.MIN_LATENT_SIDE))),
    ("controlnet", "sample", str(C.UNET_MAX_BATCH_CELLS), lambda: _controlnet((1, C.LATENT_CHANNELS, 182, 181))),
    ("controlnet", "sample", str(C.UNET_MAX_BATCH_CELLS), lambda: _controlnet((3, C.LATENT_CHANNELS, 105, 105))),
    ("controlnet", "batch-size", str(C.CONTROLNET.max_batch_size),
     lambda: _controlnet((C.CONTROLNET.max_batch_size + 1, C.LATENT_CHANNELS, 4, 4))),
    ("controlnet", "sample", f"{C.LATENT_CHANNELS}", lambda: _controlnet((1, C.LATENT_CHANNELS + 1, 8, 8))),
    ("tokenizer", "prompt", str(C.MAX_PROMPTS), lambda: {"prompt": _prompts(*[b"a"] * (C.MAX_PROMPTS + 1))}),
    ("tokenizer", "prompt[0]", str(C.MAX_PROMPT_BYTES), lambda: {"prompt": _prompts(b"x" * (C.MAX_PROMPT_BYTES + 1))}),
    ("tokenizer", "prompt", str(C.MAX_TOKENIZER_REQUEST_BYTES),
     lambda: {"prompt": _prompts(*[b"x" * C.MAX_PROMPT_BYTES] * (C.MAX_TOKENIZER_REQUEST_BYTES // C.MAX_PROMPT_BYTES),
                                 b"x")}),
]

#: the models that share a net's contract, checks and budgets get its rows: the few-step UNet the unet's, the tiny
#: autoencoder the full VAEs'
SAME_BUDGETS = {C.UNET_FEWSTEP.name: C.UNET.name, C.VAE_DECODER_TINY.name: C.VAE_DECODER.name,
                C.VAE_ENCODER_TINY.name: C.VAE_ENCODER.name}
OVER += [(twin, name, limit, make) for twin, model in SAME_BUDGETS.items()
         for m, name, limit, make in list(OVER) if m == model]


def test_the_budgets_cover_every_net_model(full_repository) -> None:
    """Every model the session repository serves but the generating ones (their request limits: the portrait rows
    of tests/test_bad_input_matrix.py) has rows, the optional nets too."""
    served = {p.name for p in full_repository.iterdir() if (p / "config.pbtxt").is_file()}
    generating = {C.PORTRAIT_GENERATOR.name, C.PORTRAIT.name, C.PORTRAIT_STREAM.name}
    assert {m for m, *_ in OVER} == served - generating
    assert {C.CONTROLNET.name, C.UNET_FEWSTEP.name, C.VAE_DECODER_TINY.name, C.VAE_ENCODER_TINY.name} <= served


def test_the_public_path_fits_the_budgets() -> None:
    # the public path fits: a portrait's candidates at MAX_SIDE_FACTOR x SD-1.5's 512 px, a template, a VAE batch
    assert C.MAX_REQUEST_PIXELS >= C.MAX_IMAGES * 1024 * 1024
    assert C.MAX_REQUEST_PIXELS >= C.MAX_TEMPLATE_SIDE ** 2
    # the served UNets' side rule (multiples of their down factor: 8 cells for SD-1.5) leaves SD-1.5's public sides
    # up to this server's largest, and the fallback for a repository without the record is SD-1.5's
    sd15_sides = C.LATENT_FACTOR * C.DEFAULT_UNET_DOWN_FACTOR
    assert sd15_sides == 64 and C.MAX_SIDE % sd15_sides == 0 and int(C.MAX_SIDE_FACTOR * 512) % sd15_sides == 0
    assert C.VAE_MAX_ITEM_CELLS >= (1024 // C.LATENT_FACTOR) ** 2
    assert C.VAE_MAX_BATCH_CELLS >= 2 * C.VAE_MAX_ITEM_CELLS  # a call holds two of the largest items
    assert C.VAE_MAX_BATCH_CELLS >= C.VAE_DECODER.max_batch_size * (512 // C.LATENT_FACTOR) ** 2  # 8 at SD-1.5 512
    # the generator's VAE calls fit the budget whatever the size (facetron.triton.bls chunks by cells)
    for side in (64, 512, 768, 1024):
        cells = side // C.LATENT_FACTOR
        assert 1 <= C.vae_chunk(cells, cells, C.VAE_DECODER.max_batch_size) * cells * cells <= C.VAE_MAX_BATCH_CELLS
    assert C.MAX_TOKENIZER_REQUEST_BYTES >= 2 * C.MAX_PROMPT_BYTES  # portrait's prompt + negative prompt


def test_the_optional_nets_share_their_twins_checks_and_budgets() -> None:
    """Why SAME_BUDGETS' twins get their net's rows: the same tensors, batch size, checks and cell budget (the
    few-step UNet runs the unet's code); the controlnet reads its samples with the unet's checks
    (triton.batching.unet_feed -> net_io.check_sample) and splits a dynamic batch within the unet's cell budget."""
    for twin, model in SAME_BUDGETS.items():
        a, b = C.BY_NAME[twin], C.BY_NAME[model]
        assert (a.inputs, a.outputs, a.max_batch_size) == (b.inputs, b.outputs, b.max_batch_size), twin
        if model in NET_CHECKS:
            assert NET_CHECKS[twin] is NET_CHECKS[model] and NET_BUDGETS[twin] is NET_BUDGETS[model], twin
    assert NET_BUDGETS["controlnet"] is NET_BUDGETS["unet"] and C.CONTROLNET.max_batch_size == C.UNET.max_batch_size
    assert C.CONTROLNET.inputs[:3] == C.UNET.inputs[:3]  # sample, timestep, encoder_hidden_states
    cost, limit = NET_BUDGETS["controlnet"]
    members = [(i, {"sample": _zeros((8, C.LATENT_CHANNELS, 64, 64))}) for i in range(3)]  # 3 x 8 x 64² cells
    runs = list(within_budget(members, NET_BUDGETS["controlnet"]))
    assert len(runs) == 3 and all(sum(cost(f) for _, f in run) <= limit for run in runs)


@pytest.fixture(scope="module")
def raw(triton):
    import tritonclient.grpc as grpcclient

    with grpcclient.InferenceServerClient(triton.grpc_url) as c:
        yield c


def _infer(raw, model: str, feed: dict[str, np.ndarray]):
    from facetron.client.tensors import infer_inputs  # the client's own wire encoding

    return raw.infer(model, infer_inputs(feed), client_timeout=120)


@pytest.mark.triton
@pytest.mark.parametrize("model, name, limit, make", OVER, ids=[f"{m}.{n}.{i}" for i, (m, n, _, _) in enumerate(OVER)])
def test_a_request_over_a_budget_is_refused_at_once(raw, model, name, limit, make) -> None:
    from tritonclient.utils import InferenceServerException

    feed = make()
    start = time.perf_counter()
    with pytest.raises(InferenceServerException) as info:
        _infer(raw, model, feed)
    elapsed = time.perf_counter() - start
    status, message = str(info.value.status()).replace("StatusCode.", ""), info.value.message()
    assert status == "INVALID_ARGUMENT", f"{model}: {status} {message}"
    assert name in message and limit in message, f"{model}: the message names neither {name!r} nor {limit}: {message}"
    assert elapsed < REFUSE_S, f"{model} {name}: refused after {elapsed:.2f} s"
    assert raw.is_server_live() and raw.is_model_ready(model)


# ----------------------------------------------------------------------------- the tokenizer's worst case


def _worst_prompts(kind: str, seed: int = 0) -> list[str]:
    """Prompts at the tokenizer's limits that cost it most: every prompt's words distinct (no cache)."""
    rng = random.Random(seed)
    per = C.MAX_TOKENIZER_REQUEST_BYTES // C.MAX_PROMPTS

    def word(n: int) -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))

    if kind == "long words":  # one word of MAX_WORD_BYTES per prompt: BPE'd whole though only 75 ids are kept
        return [word(min(per, C.MAX_WORD_BYTES)) for _ in range(C.MAX_PROMPTS)]
    if kind == "short words":  # ~1 id per word: 75 BPE calls per prompt
        return [" ".join(word(3) for _ in range(per // 4)) for _ in range(C.MAX_PROMPTS)]
    n = C.MAX_TOKENIZER_REQUEST_BYTES // C.MAX_PROMPT_BYTES  # a few prompts at MAX_PROMPT_BYTES, one word each
    return [word(C.MAX_PROMPT_BYTES) for _ in range(n)]


WORST = ["long words", "short words", "whole prompts"]


@pytest.mark.parametrize("kind", WORST)
def test_the_tokenizers_worst_case_in_process(kind) -> None:
    prompts = _worst_prompts(kind)
    assert sum(len(p.encode()) for p in prompts) <= C.MAX_TOKENIZER_REQUEST_BYTES
    tokenizer = ClipTokenizer()
    start = time.perf_counter()
    ids = tokenizer(prompts)
    elapsed = time.perf_counter() - start
    assert ids.shape == (len(prompts), C.TOKENS) and (ids[:, C.TOKENS - 2] != 49407).all()  # every context filled
    assert elapsed < TOKENIZE_S, f"{kind}: {elapsed:.2f} s"


@pytest.mark.triton
@pytest.mark.parametrize("kind", WORST)
def test_the_tokenizers_worst_case_over_grpc(raw, kind) -> None:
    prompts = _worst_prompts(kind, seed=1)  # words the server's cache has not seen
    feed = {"prompt": _prompts(*[p.encode() for p in prompts])}
    start = time.perf_counter()
    ids = _infer(raw, "tokenizer", feed).as_numpy("input_ids")
    elapsed = time.perf_counter() - start
    assert elapsed < TOKENIZE_S, f"{kind}: {elapsed:.2f} s"
    np.testing.assert_array_equal(ids, ClipTokenizer()(prompts))


def _reference_bpe(ranks: dict, token: str) -> list[str]:
    """The textbook CLIP/GPT-2 merge loop (OpenAI's ``SimpleTokenizer.bpe``): every round merges each
    occurrence of the lowest-ranked adjacent pair, left to right."""
    word = list(token[:-1]) + [token[-1] + "</w>"]
    while len(word) > 1:
        pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def test_the_heap_bpe_merges_like_the_reference_loop() -> None:
    tokenizer = ClipTokenizer()
    rng = random.Random(3)
    alphabets = [string.ascii_lowercase, "ab", "a", "aab", "esthrinoa", "人大中国日本의", "é!?.", string.digits]
    for _ in range(400):
        alphabet = rng.choice(alphabets)
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120)))
        piece = "".join(tokenizer.byte_encoder[b] for b in word.encode())
        assert tokenizer._bpe(piece) == _reference_bpe(tokenizer.ranks, piece), word


def test_a_word_over_the_limit_is_split_not_refused() -> None:
    """The ids of a long word equal those of its first MAX_WORD_BYTES as a piece the word continues."""
    tokenizer = ClipTokenizer()
    word = "ab" * C.MAX_PROMPT_BYTES  # 32 KB: the word itself is not BPE'd whole
    start = time.perf_counter()
    ids = tokenizer.encode(word, 75)
    assert time.perf_counter() - start < 0.5
    head = "".join(tokenizer.byte_encoder[b] for b in word[: C.MAX_WORD_BYTES].encode())
    assert ids == [tokenizer.encoder[t] for t in tokenizer._bpe(head, end=False)][:75]
    # pieces of at most MAX_WORD_BYTES, cut between characters (3 bytes each here), only the last ends the word
    cjk = "肖" * C.MAX_WORD_BYTES
    inverse = {v: k for k, v in tokenizer.byte_encoder.items()}
    pieces = [(bytes(inverse[c] for c in piece), end) for piece, end in tokenizer._pieces(cjk)]
    assert all(len(data) <= C.MAX_WORD_BYTES for data, _ in pieces)
    assert "".join(data.decode("utf-8") for data, _ in pieces) == cjk
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]


# ----------------------------------------------------------------------------- a dynamic batch over a budget


def test_a_dynamic_batch_over_the_budget_runs_as_calls_within_it() -> None:
    def feed(n: int, side: int) -> dict[str, np.ndarray]:
        return {"sample": np.zeros((n, C.LATENT_CHANNELS, side, side), np.float32)}

    cost, limit = NET_BUDGETS["unet"]
    assert limit == C.UNET_MAX_BATCH_CELLS and cost(feed(3, 10)) == 300
    members = [(i, feed(1, 128)) for i in range(3)] + [(3, feed(8, 64))]  # 3 x 16384 + 32768 cells
    runs = list(within_budget(members, (cost, limit)))
    assert [[i for i, _ in run] for run in runs] == [[0, 1], [2], [3]]
    assert all(sum(cost(f) for _, f in run) <= limit for run in runs)
    assert list(within_budget(members, None)) == [members]
