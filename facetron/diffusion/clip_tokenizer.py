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
import heapq
import json
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex

from facetron.assets import asset_path
from facetron.contract import MAX_WORD_BYTES, TOKENS

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


#: pieces up to this many characters are cached (prompts repeat words; a long piece is rarely seen twice)
_CACHE_PIECE = 64


class ClipTokenizer:
    """Text -> CLIP token ids, padded/truncated to 77 (SD-1.5 convention).

    Bounded work per prompt: the BPE of a word is O(L log L) (a heap of pair ranks, the same merges as
    the reference loop); a word longer than ``max_word_bytes`` is tokenized as pieces of at most that many
    bytes (split on a character boundary: a long word is never refused, and its ids equal the reference's
    up to the first cut); and encoding stops once the ids that fit the context exist."""

    def __init__(self, bpe_path: str | None = None, context_length: int = TOKENS, max_word_bytes: int = MAX_WORD_BYTES):
        self.encoder = build_vocab(bpe_path)
        self.ranks = {m: i for i, m in enumerate(load_merges(bpe_path))}
        self.byte_encoder = bytes_to_unicode()
        self.context_length = context_length
        self.bos_id = self.encoder[BOS]
        self.eos_id = self.encoder[EOS]
        self.pad_id = self.eos_id
        self.max_word_bytes = max_word_bytes
        self._cache: dict[str, list[str]] = {BOS: [BOS], EOS: [EOS]}

    def _bpe(self, token: str, end: bool = True) -> list[str]:
        """The BPE symbols of one word (``end``: its last symbol carries ``</w>``; False for a piece that
        a longer word continues). The reference merges, each round, every occurrence of the lowest-ranked
        adjacent pair, left to right; a heap of (rank, position) pops them in that order, since every pair
        a merge creates contains the merged symbol, whose merges all rank after the one that made it (true
        of CLIP's merges: each symbol is made by exactly one earlier merge)."""
        key = token if end else token + " "  # " " is never in a byte-encoded piece
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        word: list = list(token)
        if end:
            word[-1] += "</w>"
        ranks = self.ranks
        n = len(word)
        nxt = list(range(1, n)) + [-1]
        prev = list(range(-1, n - 1))
        heap = [(r, i) for i in range(n - 1) if (r := ranks.get((word[i], word[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            r, i = heapq.heappop(heap)
            j = nxt[i]
            if word[i] is None or j < 0 or ranks.get((word[i], word[j])) != r:
                continue  # stale: a merge changed this pair since it was pushed
            word[i] += word[j]
            word[j] = None
            k = nxt[i] = nxt[j]
            if k >= 0:
                prev[k] = i
                if (rk := ranks.get((word[i], word[k]))) is not None:
                    heapq.heappush(heap, (rk, i))
            if (p := prev[i]) >= 0 and (rp := ranks.get((word[p], word[i]))) is not None:
                heapq.heappush(heap, (rp, p))
        out = [w for w in word if w is not None]
        if len(token) <= _CACHE_PIECE and len(self._cache) < 100_000:
            self._cache[key] = out
        return out

    def _pieces(self, piece: str):
        """One word of the pattern as (byte-encoded piece, ends the word): itself, or pieces of at most
        ``max_word_bytes`` bytes cut on character boundaries when longer."""
        data = piece.encode("utf-8")
        if len(data) <= self.max_word_bytes:
            yield "".join(self.byte_encoder[b] for b in data), True
            return
        start = 0
        while start < len(data):
            stop = min(start + self.max_word_bytes, len(data))
            while start < stop < len(data) and (data[stop] & 0xC0) == 0x80:  # not inside a UTF-8 sequence
                stop -= 1
            if stop == start:  # max_word_bytes under one character's bytes: the whole character
                stop += 1
                while stop < len(data) and (data[stop] & 0xC0) == 0x80:
                    stop += 1
            yield "".join(self.byte_encoder[b] for b in data[start:stop]), stop == len(data)
            start = stop

    def encode(self, text: str, max_ids: int | None = None) -> list[int]:
        """BPE ids of ``text`` without special tokens or padding; with ``max_ids``, the first ``max_ids``
        (the words after them are not tokenized)."""
        text = normalize(text)
        ids: list[int] = []
        for match in _PATTERN.finditer(text):
            for unicode_piece, end in self._pieces(match.group()):
                ids.extend(self.encoder[t] for t in self._bpe(unicode_piece, end))
                if max_ids is not None and len(ids) >= max_ids:
                    return ids[:max_ids]
        return ids

    def __call__(self, texts: list[str] | str) -> np.ndarray:
        """``int32 [N, 77]``: BOS, ids truncated to 75, EOS, EOS-padding."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = self.encode(text, self.context_length - 2)
            out[row, 0] = self.bos_id
            out[row, 1 : 1 + len(ids)] = ids
            out[row, 1 + len(ids)] = self.eos_id
        return out
