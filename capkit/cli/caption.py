"""``tools/caption.py --checkpoint DIR IMAGE [IMAGE ...]``: print one caption per image."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from capkit.data.transforms import visible_region
from capkit.engine.device import resolve_device
from capkit.inference import caption_images, load_trained
from capkit.types import EOS
from capkit.visualization import save_attention_figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capkit caption", description="Caption images with a trained model.")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (any format PIL reads)")
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="DIR", help="e.g. RUN_DIR/checkpoints/best")
    parser.add_argument("--beam", type=int, default=3, help="beam size (1: greedy; default: %(default)s)")
    parser.add_argument("--max-len", type=int, default=16, help="most words per caption (default: %(default)s)")
    parser.add_argument("--length-penalty", type=float, default=0.0, help="default: %(default)s")
    parser.add_argument("--attention-out", type=Path, metavar="DIR", help="save a per-word attention figure per image")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    args = parser.parse_args(argv)

    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        print(f"error: no such image file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        trained = load_trained(args.checkpoint, resolve_device(args.device))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pictures = []
    for path in args.images:
        try:
            with Image.open(path) as img:
                pictures.append(img.convert("RGB"))
        except OSError as err:
            print(f"error: cannot read image {path}: {err}", file=sys.stderr)
            return 2
    captions, generation = caption_images(
        trained, pictures, beam_size=args.beam, max_len=args.max_len, length_penalty=args.length_penalty
    )
    if args.attention_out:
        args.attention_out.mkdir(parents=True, exist_ok=True)
    for path, picture, caption, hyp in zip(args.images, pictures, captions, generation.best):
        print(f"{path}\t{caption}")
        if args.attention_out:
            words = [trained.vocab.itos[t] for t in hyp.tokens] + [EOS]
            figure = args.attention_out / f"{path.stem}_attention.png"
            region = visible_region(*picture.size, trained.model.encoder.data_config)
            save_attention_figure(figure, picture, words, hyp.alphas, generation.grid, title=caption, region=region)
    return 0


if __name__ == "__main__":
    sys.exit(main())
