"""``shapes``: a synthetic grounding dataset of coloured shapes, deterministic from a seed.

Each image holds 1-3 objects (shape x colour x size, no two with the same colour and shape) on a plain or
textured background. Its five captions come from several templates and name objects by colour and
shape (optionally size) plus spatial relations: "a small red circle above a blue square", "there is a
blue square below a red circle". Every object's box is recorded, for grounding and attention checks.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from capkit.data.datasets.base import CaptionDataset
from capkit.data.records import Box, ImageRecord
from capkit.registry import DATASETS

__all__ = ["ShapesDataset", "Scene", "Shape", "make_scene", "render_scene", "COLOURS", "SHAPES", "SIZES"]

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SIZES = {"small": (0.16, 0.22), "large": (0.30, 0.38)}  # side of the object's box, as a fraction of the image
BACKGROUNDS = ("plain", "textured")
NUMBERS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, x1 and y1 exclusive

    def name(self, with_size: bool) -> str:
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class Scene:
    image_size: int
    background: str  # plain | textured
    bg_colour: tuple[int, int, int]
    texture_seed: int
    objects: tuple[Shape, ...]


def make_scene(rng: random.Random, image_size: int) -> Scene:
    """1-3 non-overlapping objects with distinct (colour, shape) at random positions."""
    kinds = rng.sample([(s, c) for s in SHAPES for c in COLOURS], rng.randint(1, 3))
    objects: list[Shape] = []
    for shape, colour in kinds:
        size = rng.choice(list(SIZES))
        for _ in range(100):  # rejection sampling of a free position
            side = int(image_size * rng.uniform(*SIZES[size]))
            x0, y0 = rng.randrange(image_size - side + 1), rng.randrange(image_size - side + 1)
            box = (x0, y0, x0 + side, y0 + side)
            if not any(_overlap(box, o.box, margin=2) for o in objects):
                objects.append(Shape(shape, colour, size, box))
                break
    return Scene(
        image_size=image_size,
        background=rng.choice(BACKGROUNDS),
        bg_colour=tuple(rng.randrange(200, 250) for _ in range(3)),
        texture_seed=rng.getrandbits(32),
        objects=tuple(objects),
    )


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene: (image_size x image_size) RGB, byte-identical for the same scene."""
    n = scene.image_size
    pixels = np.broadcast_to(np.array(scene.bg_colour, dtype=np.int16), (n, n, 3))
    if scene.background == "textured":
        noise = np.random.default_rng(scene.texture_seed).integers(-30, 31, size=(n, n, 1), dtype=np.int16)
        stripes = ((np.arange(n)[:, None] + np.arange(n)[None, :]) // 6 % 2 * 20).astype(np.int16)[..., None]
        pixels = pixels + noise - stripes
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box[0], obj.box[1], obj.box[2] - 1, obj.box[3] - 1  # PIL's corners are inclusive
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    return image


def make_captions(scene: Scene, rng: random.Random, count: int = 5) -> list[str]:
    """``count`` distinct captions drawn from every template that fits the scene."""
    objs = scene.objects

    def a(obj: Shape) -> str:  # "a small red circle" / "an orange square", size mentioned at random
        name = obj.name(with_size=rng.random() < 0.5)
        return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"

    candidates = [f"{a(objs[0])} on a {scene.background} background"]  # every caption names an object
    if len(objs) == 1:
        (o,) = objs
        candidates += [a(o), f"there is {a(o)} in the picture", f"{a(o)} in the {_region(o, scene.image_size)}",
                       f"a single {o.name(with_size=False)}", f"an image of {a(o)}"]
    else:
        listed = " and ".join([", ".join(a(o) for o in objs[:-1]), a(objs[-1])])
        candidates += [listed, f"{NUMBERS[len(objs)]} shapes : {listed}", f"an image with {listed}"]
        for i, j in [(i, j) for i in range(len(objs)) for j in range(len(objs)) if i < j]:
            rel, inverse = _relation(objs[i], objs[j])
            candidates += [f"{a(objs[i])} {rel} {a(objs[j])}", f"there is {a(objs[j])} {inverse} {a(objs[i])}",
                           f"{a(objs[j])} is {inverse} {a(objs[i])}"]
    return rng.sample(list(dict.fromkeys(candidates)), count)


def _relation(a: Shape, b: Shape) -> tuple[str, str]:
    """Where ``a`` is relative to ``b``, and the inverse: ("above", "below"), ("to the left of", ...)."""
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(ay - by) >= abs(ax - bx):
        return ("above", "below") if ay < by else ("below", "above")
    return ("to the left of", "to the right of") if ax < bx else ("to the right of", "to the left of")


def _region(obj: Shape, image_size: int) -> str:
    x, y = obj.centre
    row = ("top", "middle", "bottom")[min(int(3 * y / image_size), 2)]
    col = ("left", "centre", "right")[min(int(3 * x / image_size), 2)]
    return "centre" if row == "middle" and col == "centre" else f"{row} {col}".replace("middle ", "")


def _overlap(a: tuple[int, ...], b: tuple[int, ...], margin: int) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


@DATASETS.register("shapes")
class ShapesDataset(CaptionDataset):
    """Synthetic shapes: ``num_<split>`` images, rendered on demand, the same for the same ``seed``.

    Args:
        split: ``train``, ``val`` or ``test``.
        seed: decides every scene and caption (each split and image index has its own stream).
        image_size: side of the square images, in pixels (the encoder's transform resizes them).
        num_train, num_val, num_test: images per split.
    """

    name = "shapes"

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        image_size: int = 112,
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 200,
    ):
        super().__init__(split)
        self.seed, self.image_size = seed, image_size
        count = {"train": num_train, "val": num_val, "test": num_test}[split]
        for index in range(count):
            rng = random.Random(f"shapes/{seed}/{split}/{index}")  # str seeds hash deterministically (sha512)
            scene = make_scene(rng, image_size)
            self.records.append(
                ImageRecord(
                    f"shapes_{split}_{index:05d}",
                    make_captions(scene, rng),
                    loader=partial(render_scene, scene),
                    boxes=[Box(o.name(with_size=True), *o.box) for o in scene.objects],
                )
            )

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "seed": self.seed, "image_size": self.image_size, "count": len(self.records)}
