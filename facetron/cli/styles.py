"""``facetron styles list|add|remove``: the style registry (facetron.style_registry).

``add --lora FILE`` reads any LoRA file facetron reads (diffusers, peft,
kohya), checks it against the base model (a LoRA for another base model is
refused, naming the first layer whose shape differs), writes it in
facetron's canonical layout (what the server's numpy reader reads) and
installs the style atomically: on any error nothing is installed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from facetron.contract import DEFAULT_STYLE_WEIGHT, MAX_STYLE_WEIGHT
from facetron.diffusion.styles import NEGATIVE
from facetron.style_registry import STYLES_ENV, StyleRegistry, styles_for

STYLES_DIR_HELP = f"style registry (default: {STYLES_ENV}, else styles/ beside the user registry)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("styles", help="list, add or remove portrait styles (prompt + optional style LoRA)")
    nested = p.add_subparsers(dest="styles_command", required=True, metavar="ACTION")
    ls = nested.add_parser("list", help="built-in and installed styles")
    ls.add_argument("--json", action="store_true", help="one JSON object per style")
    ls.add_argument("--styles-dir", type=Path, default=None, help=STYLES_DIR_HELP)
    ls.set_defaults(func=run_list)
    add = nested.add_parser("add", help="install a style (atomically)")
    add.add_argument("name", help="style name (A-Z a-z 0-9 _ -, up to 64)")
    add.add_argument("--prompt", required=True, help="prompt template with {trigger} and {subject}")
    add.add_argument("--negative", default=NEGATIVE, help="negative prompt (default: facetron's)")
    add.add_argument("--lora", type=Path, default=None, help="style LoRA (.safetensors: diffusers, peft or kohya)")
    add.add_argument("--weight", type=float, default=None,
                     help=f"style LoRA weight in 0..{MAX_STYLE_WEIGHT:g} (default: the server's w_style, "
                          f"{DEFAULT_STYLE_WEIGHT:g})")
    add.add_argument("--base-model", type=Path, default=None,
                     help="base model the LoRA must fit (default: the tiny embedded model)")
    add.add_argument("--replace", action="store_true", help="replace an installed style of that name")
    add.add_argument("--styles-dir", type=Path, default=None, help=STYLES_DIR_HELP)
    add.set_defaults(func=run_add)
    rm = nested.add_parser("remove", help="uninstall a style")
    rm.add_argument("name", help="an installed style's name")
    rm.add_argument("--styles-dir", type=Path, default=None, help=STYLES_DIR_HELP)
    rm.set_defaults(func=run_remove)


def registry(args: argparse.Namespace) -> StyleRegistry:
    return StyleRegistry(args.styles_dir) if args.styles_dir else styles_for()


def run_list(args: argparse.Namespace) -> int:
    styles = registry(args)
    for name in styles.names():
        info = styles.describe(name)
        if args.json:
            print(json.dumps(info, ensure_ascii=False))
        else:
            lora = "-" if info["lora"] is None else f"lora@{info['lora_weight'] if info['lora_weight'] is not None else 'w_style'}"
            print(f"{name}\t{'built-in' if info['builtin'] else 'installed'}\t{lora}\t{info['prompt']}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    styles = registry(args)
    styles.check_new(args.name, args.prompt, args.negative, args.weight, has_lora=args.lora is not None,
                     replace=args.replace)  # before the slow part
    if args.lora is None:
        style = styles.add(args.name, args.prompt, args.negative, None, args.weight, replace=args.replace)
    else:
        with tempfile.TemporaryDirectory() as work:
            canonical = canonical_style_lora(args.lora, Path(work) / "lora.safetensors", args.base_model)
            style = styles.add(args.name, args.prompt, args.negative, canonical, args.weight,
                               source=str(args.lora.resolve()), replace=args.replace)
    print(f"installed style {style.name!r} in {styles.root}" + (f" (LoRA {args.lora})" if args.lora else ""))
    return 0


def canonical_style_lora(src: Path, dst: Path, base_model: Path | None) -> Path:
    """``src`` checked against the base model's UNet and written canonically to ``dst``."""
    from facetron.diffusion.base_model import load_base_model
    from facetron.export.lora_files import check_lora_matches, load_lora, write_canonical_lora

    lora = load_lora(src)  # any layout; NotFoundError / InvalidInputError name the file
    base = load_base_model(base_model)
    matched = check_lora_matches(lora, {"unet": base.unet, "text_encoder": base.text_encoder})
    return write_canonical_lora(matched, dst)


def run_remove(args: argparse.Namespace) -> int:
    styles = registry(args)
    styles.remove(args.name)
    print(f"removed style {args.name!r} from {styles.root}")
    return 0
