"""``tools/visualize.py --checkpoint DIR IMAGE --out FIGURE.png``: caption one image and draw its attention."""
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
    parser = argparse.ArgumentParser(
        prog="capkit visualize", description="Draw where a trained model looks for every word it writes."
    )
    parser.add_argument("image", type=Path, help="an image file")
    parser.add_argument("--checkpoint", type=Path, required=True, metavar="DIR", help="e.g. RUN_DIR/checkpoints/best")
    parser.add_argument("--out", type=Path, required=True, metavar="PNG", help="where to write the figure")
    parser.add_argument("--beam", type=int, default=3, help="beam size (default: %(default)s)")
    parser.add_argument("--max-len", type=int, default=16, help="most words (default: %(default)s)")
    parser.add_argument("--columns", type=int, default=5, help="panels per row (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        with Image.open(args.image) as img:
            picture = img.convert("RGB")
        trained = load_trained(args.checkpoint, resolve_device(args.device))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    (caption,), generation = caption_images(trained, [picture], beam_size=args.beam, max_len=args.max_len)
    hyp = generation.best[0]
    words = [trained.vocab.itos[t] for t in hyp.tokens] + [EOS]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_attention_figure(
        args.out, picture, words, hyp.alphas, generation.grid, columns=args.columns, title=caption,
        region=visible_region(*picture.size, trained.model.encoder.data_config),
    )
    print(f"{caption}\n{args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
