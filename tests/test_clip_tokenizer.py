"""facetron's CLIP tokenizer against two oracles that share no code or file with it:

* **open_clip's ``SimpleTokenizer``** (the BPE of OpenAI's CLIP), its
  ``tokenizer.py`` loaded by path from the installed ``open_clip_torch``
  (the package's ``__init__`` imports torchvision, which does not load here;
  the module itself imports ``ftfy``, which is not installed: a stub gives it
  ftfy's Unicode NFC step — ftfy's heuristic mojibake repairs are not part of
  SD pipelines' tokenizer);
* **transformers' ``CLIPTokenizer``** — what diffusers' SD pipelines run —
  over a vocabulary this test writes from open_clip's own ``encoder`` and
  BPE merges file (never facetron's ``write_tokenizer_files``).

Known, deliberate differences from open_clip (facetron follows the SD
pipelines' tokenizer, checked against the second oracle on every prompt):
open_clip HTML-unescapes text and names its special tokens
``<start_of_text>``/``<end_of_text>``; it pads with 0 where SD-1.5 pads with
``<|endoftext|>``; Python's ``lower()`` turns a word-final capital sigma
into "ς" where the tokenizers library gives "σ"; ``str.split`` treats the
separators U+001C..U+001F as whitespace, the pipelines' ``\\s`` does not.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
import types
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from facetron.contract import VOCAB_SIZE
from facetron.diffusion.clip_tokenizer import ClipTokenizer, build_vocab

BOS, EOS = 49406, 49407
SD_SPECIALS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}

PROMPTS = [
    "a photo of a man",
    "",
    "   ",
    "A Photo OF a WOMAN, Studio Lighting!!",
    "Ünïcödé café naïve crème brûlée Ångström Øresund façade jalapeño",
    "東京 中文提示词：一个女人的肖像，柔和的光线 日本語のプロンプト、カタカナ 한국어 프롬프트",
    "emoji 😀 👩‍🎨 🏳️‍🌈 👍🏽 ❤️ 🤖🤖🤖",
    "  lots   of\tspaces\nand\r\nnewlines  \u00a0nbsp\u3000ideographic\u2028line\x85nel\x0bvt\x0cff",
    "it's a dog's life, isn't it? we'll see, they've gone, I'm here, you'd know",
    "numbers 123456 3.14159 and 1,000,000 -42 1e-9 ½ ² ٣",
    "punctuation!!! ??? ... ,,, ;; :: -- __ (( )) [[ ]] {{ }} \"quoted\" 'single' #tag @user $5 %20 ^ * + = | \\ / ~ `",
    "“curly quotes” and ‘single’ — dashes… ellipsis «guillemets» ¿qué? ¡sí!",
    "cafÃ© ＡＢＣ ﬁ e\u0301 combining accent",
    "Straße İstanbul ǅ ŉ ẞ ß ﬀ",
    "portrait " * 100,  # over-long: truncated to 75 tokens + EOS
    "x" * 500,  # one very long word
    "a photo of <facetron-user>, a handsome man, best quality, 8k, (masterpiece:1.2), [bad hands]",
]
# open_clip differs from the SD pipelines on these by design (module docstring); the pipeline oracle decides
PIPELINE_ONLY = {
    "&amp; html &lt;b&gt; is not unescaped": "open_clip HTML-unescapes",
    "<|startoftext|> special <|endoftext|> tokens in text": "open_clip's special tokens are named differently",
    "ΣΊΣΥΦΟΣ ΟΔΟΣ": "Python lowercases a final capital sigma to ς",
    "unit\x1fseparator\x1cfile": "str.split treats U+001C..U+001F as whitespace",
}


def random_prompts(n: int = 150, seed: int = 0) -> list[str]:
    """Seeded random prompts over letters, accents, CJK, emoji, digits, punctuation and whitespace."""
    rng = np.random.default_rng(seed)
    pools = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿœšžÀÉÎÕÜ",
             "人物肖像照片光线柔和女性男性の写真가나다", "😀😃🙂🤖🎨🌈👍🏽❤️✨", "0123456789", "!?.,;:'\"-_()[]{}#@$%^*+=|/~<>",
             " ", "\t\n"]
    weights = np.array([30, 6, 6, 3, 5, 8, 15, 2], float)
    out = []
    for _ in range(n):
        k = rng.choice(len(pools), size=int(rng.integers(1, 120)), p=weights / weights.sum())
        out.append("".join(pools[i][rng.integers(len(pools[i]))] for i in k))
    return out


@pytest.fixture(scope="module")
def open_clip_module():
    """open_clip/tokenizer.py, executed from the installed package folder (not imported as a package)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("open_clip_torch is not installed (requirements/nodeps.txt installs it with --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    ftfy = types.ModuleType("ftfy")
    ftfy.fix_text = lambda text: unicodedata.normalize("NFC", text)  # ftfy's normalisation step only
    saved = sys.modules.get("ftfy")
    sys.modules["ftfy"] = ftfy
    try:
        loader = importlib.util.spec_from_file_location("open_clip_tokenizer_oracle", path)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("ftfy", None)
        else:
            sys.modules["ftfy"] = saved
    return module


@pytest.fixture(scope="module")
def open_clip(open_clip_module):
    return open_clip_module.SimpleTokenizer()


@pytest.fixture(scope="module")
def pipeline(open_clip, open_clip_module, tmp_path_factory):
    """transformers.CLIPTokenizer (diffusers' SD tokenizer) over files written from open_clip's vocabulary."""
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("oracle_tokenizer")
    vocab = {SD_SPECIALS.get(token, token): i for token, i in open_clip.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = gzip.open(open_clip_module.default_bpe()).read().decode("utf-8").split("\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines[1:49152 - 256 - 2 + 1]) + "\n", encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                                              "do_lower_case": True, **specials}))
    return CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


def as_sd(open_clip_row: np.ndarray) -> np.ndarray:
    """open_clip's row with SD-1.5's padding: after the first EOS, EOS instead of 0."""
    row = np.asarray(open_clip_row, np.int64).copy()
    end = int(np.argmax(row == EOS))
    assert row[end] == EOS and not row[end + 1:].any()
    row[end + 1:] = EOS
    return row


def test_vocabulary_is_open_clips(open_clip) -> None:
    vocab = build_vocab()
    assert len(vocab) == VOCAB_SIZE == len(open_clip.encoder)
    assert vocab == {SD_SPECIALS.get(t, t): i for t, i in open_clip.encoder.items()}
    assert (open_clip.sot_token_id, open_clip.eot_token_id) == (BOS, EOS)


def test_known_ids(tokenizer: ClipTokenizer) -> None:
    ids = tokenizer(["a photo of a man"])[0]
    assert ids[:7].tolist() == [BOS, 320, 1125, 539, 320, 786, EOS]
    assert (ids[7:] == EOS).all()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_open_clip(tokenizer: ClipTokenizer, open_clip, prompt: str) -> None:
    assert tokenizer.encode(prompt) == open_clip.encode(prompt)
    got = tokenizer([prompt])
    assert got.dtype == np.int32 and got.shape == (1, 77)
    np.testing.assert_array_equal(got[0], as_sd(open_clip([prompt])[0].numpy()))


@pytest.mark.parametrize("prompt", PROMPTS + list(PIPELINE_ONLY))
def test_matches_the_pipelines_tokenizer(tokenizer: ClipTokenizer, pipeline, prompt: str) -> None:
    want = pipeline([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(tokenizer([prompt]), want.astype(np.int32))


@pytest.mark.parametrize("prompt", list(PIPELINE_ONLY))
def test_known_differences_from_open_clip_are_real(tokenizer: ClipTokenizer, open_clip, prompt: str) -> None:
    """Each listed difference still exists (a stale entry would hide a regression)."""
    assert tokenizer.encode(prompt) != open_clip.encode(prompt), PIPELINE_ONLY[prompt]


def test_random_corpus_matches_both(tokenizer: ClipTokenizer, open_clip, pipeline) -> None:
    prompts = random_prompts()
    got = tokenizer(prompts)
    want = pipeline(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(got, want.astype(np.int32))
    for row, prompt in zip(got, prompts):
        np.testing.assert_array_equal(row, as_sd(open_clip([prompt])[0].numpy()), err_msg=repr(prompt))


def test_truncation_keeps_bos_and_eos(tokenizer: ClipTokenizer, open_clip) -> None:
    for prompt in ("portrait " * 100, "x" * 500, "東京" * 200, "😀" * 100):
        ids = tokenizer([prompt])[0]
        assert ids[0] == BOS and ids[-1] == EOS and (ids[1:76] != EOS).all()
        assert ids[1:76].tolist() == open_clip.encode(prompt)[:75]
    empty = tokenizer([""])[0]
    assert empty[0] == BOS and (empty[1:] == EOS).all()
