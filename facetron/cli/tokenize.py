"""``facetron tokenize``: CLIP token ids of prompts from a running server."""

from __future__ import annotations

import argparse
import json

from facetron.client import DEFAULT_URL, FacetronClient


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="tokenize prompts with the served tokenizer (gRPC)")
    p.add_argument("prompts", nargs="+", help="prompt texts")
    p.add_argument("--server", default=DEFAULT_URL, help="host:port of Triton's gRPC endpoint")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds for the call")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with FacetronClient(args.server, timeout_s=args.timeout) as client:
        ids = client.tokenize(args.prompts)
    for prompt, row in zip(args.prompts, ids.tolist()):
        end = row.index(49407) + 1
        print(json.dumps({"prompt": prompt, "input_ids": row[:end], "padded_to": len(row)}, ensure_ascii=False))
    return 0
