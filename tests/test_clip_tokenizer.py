"""facetron's CLIP tokenizer vs transformers.CLIPTokenizer (what diffusers'
SD pipelines use), on the vocabulary rebuilt from open_clip's BPE file."""

from __future__ import annotations

import numpy as np
import pytest

from facetron.diffusion.clip_tokenizer import VOCAB_SIZE, ClipTokenizer, build_vocab, write_tokenizer_files

PROMPTS = [
    "a photo of a man",
    "",
    "   ",
    "A Photo OF a WOMAN, Studio Lighting!!",
    "Ünïcödé café naïve 東京 😀 emoji",
    "  lots   of\tspaces\nand\r\nnewlines  ",
    "it's a dog's life, isn't it? we'll see, they've gone, I'm here, you'd know",
    "numbers 123456 3.14159 and 1,000,000",
    "&amp; html &lt;b&gt; is not unescaped",
    "<|startoftext|> special <|endoftext|> tokens in text",
    "cafÃ© ＡＢＣ ﬁ e\u0301 combining accent",
    "ΣΊΣΥΦΟΣ Straße İstanbul ΟΔΟΣ",
    "portrait " * 100,  # over-long: truncated to 77
    "x" * 500,  # one very long word
    "a photo of <facetron-user>, a handsome man, best quality, 8k",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder = write_tokenizer_files(tmp_path_factory.mktemp("clip_tokenizer"))
    return CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


def test_vocabulary_is_standard_clip() -> None:
    vocab = build_vocab()
    assert len(vocab) == VOCAB_SIZE
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_known_ids(tokenizer: ClipTokenizer) -> None:
    ids = tokenizer(["a photo of a man"])[0]
    assert ids[:7].tolist() == [49406, 320, 1125, 539, 320, 786, 49407]
    assert (ids[7:] == 49407).all()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_transformers(tokenizer: ClipTokenizer, reference, prompt: str) -> None:
    expected = reference([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="np")[
        "input_ids"
    ]
    got = tokenizer([prompt])
    assert got.dtype == np.int32 and got.shape == (1, 77)
    np.testing.assert_array_equal(got, expected.astype(np.int32))


def test_truncation_keeps_bos_and_eos(tokenizer: ClipTokenizer) -> None:
    ids = tokenizer(["portrait " * 100])[0]
    assert ids[0] == 49406 and ids[-1] == 49407
    assert (ids[1:76] != 49407).all()
