"""CLIP byte-level BPE tokenizer, built from the vocabulary that ships in
``open_clip_torch`` (no download).

It reproduces the tokenizer of Stable Diffusion 1.5's text encoder
(``openai/clip-vit-large-patch14``): ``<|startoftext|>`` + up to 75 BPE
tokens + ``<|endoftext|>``, padded to 77 with ``<|endoftext|>`` (SD-1.5's
pad token). The vocabulary is rebuilt the way OpenAI's and open_clip's
``SimpleTokenizer`` build it: the 256 byte symbols, their ``</w>`` forms,
the first 48,894 merges, then the two special tokens (49,408 entries).
"""

from __future__ import annotations

import gzip
import json
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex

from facetron.assets import asset_path
from facetron.contract import TOKENS

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
_NUM_MERGES = 49152 - 256 - 2

_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=2)
def load_merges(bpe_path: str | None = None) -> tuple[tuple[str, str], ...]:
    """The BPE merges of CLIP's vocabulary file, in rank order."""
    path = Path(bpe_path) if bpe_path else asset_path("clip_bpe")
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    return tuple(tuple(m.split()) for m in merges)  # type: ignore[misc]


def build_vocab(bpe_path: str | None = None) -> dict[str, int]:
    """token -> id for the standard 49,408-entry CLIP vocabulary."""
    units = list(bytes_to_unicode().values())
    tokens = units + [u + "</w>" for u in units]
    tokens += ["".join(m) for m in load_merges(bpe_path)]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer_files(out_dir: str | Path, bpe_path: str | None = None) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and configs in the layout
    ``transformers.CLIPTokenizer.from_pretrained`` reads (a diffusers
    ``tokenizer/`` folder)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(build_vocab(bpe_path), ensure_ascii=False))
    merges = "#version: 0.2\n" + "\n".join(" ".join(m) for m in load_merges(bpe_path)) + "\n"
    (out / "merges.txt").write_text(merges, encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS})
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": TOKENS,
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": EOS,
                "do_lower_case": True,
            }
        )
    )
    return out


def normalize(text: str) -> str:
    """The normalisation of ``transformers.CLIPTokenizer`` (what diffusers'
    SD pipelines use): Unicode NFC, runs of whitespace -> one space,
    lowercase. (OpenAI's original also ran ftfy and html.unescape; SD
    pipelines do not, so neither does facetron.)"""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    # Python lowercases a word-final capital sigma to "ς"; the tokenizers
    # library (Rust, char by char) always gives "σ".
    return text.replace("Σ", "σ").lower()


class ClipTokenizer:
    """Text -> CLIP token ids, padded/truncated to 77 (SD-1.5 convention)."""

    def __init__(self, bpe_path: str | None = None, context_length: int = TOKENS):
        self.encoder = build_vocab(bpe_path)
        self.ranks = {m: i for i, m in enumerate(load_merges(bpe_path))}
        self.byte_encoder = bytes_to_unicode()
        self.context_length = context_length
        self.bos_id = self.encoder[BOS]
        self.eos_id = self.encoder[EOS]
        self.pad_id = self.eos_id
        self._cache: dict[str, list[str]] = {BOS: [BOS], EOS: [EOS]}

    def _bpe(self, token: str) -> list[str]:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        if len(self._cache) < 100_000:
            self._cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without special tokens or padding."""
        text = normalize(text)
        ids: list[int] = []
        for piece in _PATTERN.findall(text):
            unicode_piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(unicode_piece))
        return ids

    def __call__(self, texts: list[str] | str) -> np.ndarray:
        """``int32 [N, 77]``: BOS, ids truncated to 75, EOS, EOS-padding."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = self.encode(text)[: self.context_length - 2]
            out[row, 0] = self.bos_id
            out[row, 1 : 1 + len(ids)] = ids
            out[row, 1 + len(ids)] = self.eos_id
        return out
