import re

import numpy as np

from capkit.data.datasets.shapes import COLOURS, SHAPES, ShapesDataset
from capkit.data.vocab import tokenize

SIZES = dict(num_train=60, num_val=10, num_test=5)


def test_same_seed_gives_byte_identical_images_and_captions():
    a, b = ShapesDataset("train", seed=3, **SIZES), ShapesDataset("train", seed=3, **SIZES)
    for ra, rb in zip(a.records, b.records):
        assert ra.captions == rb.captions and ra.boxes == rb.boxes
        assert ra.open().tobytes() == rb.open().tobytes()
    other = ShapesDataset("train", seed=4, **SIZES)
    assert [r.captions for r in other.records] != [r.captions for r in a.records]


def test_split_sizes_and_five_distinct_captions():
    assert [len(ShapesDataset(s, **SIZES)) for s in ("train", "val", "test")] == [60, 10, 5]
    data = ShapesDataset("val", image_size=96, **SIZES)
    for r in data.records:
        assert len(set(r.captions)) == 5 and 1 <= len(r.boxes) <= 3
        assert r.open().size == (96, 96)


def test_boxes_inside_image_and_objects_drawn_there():
    data = ShapesDataset("train", image_size=112, **SIZES)
    for r in data.records:
        pixels = np.asarray(r.open())
        for box in r.boxes:
            assert 0 <= box.x0 < box.x1 <= 112 and 0 <= box.y0 < box.y1 <= 112
            colour = np.array(COLOURS[box.label.split()[1]])
            centre = pixels[(box.y0 + box.y1) // 2, (box.x0 + box.x1) // 2]
            assert np.abs(centre.astype(int) - colour).max() < 5, (r.image_id, box)


def test_captions_name_only_objects_in_the_image_and_at_least_one():
    pattern = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
    for r in ShapesDataset("train", **SIZES).records:
        present = {tuple(b.label.split()[1:]) for b in r.boxes}
        for caption in r.captions:
            named = set(pattern.findall(caption))
            assert named <= present, (caption, present)
            assert named, caption  # grounding needs a named object in every caption
            for count, number in enumerate(("one", "two", "three"), 1):
                if caption.startswith(number):
                    assert count == len(present), (caption, present)
            shape_words = [w for w in tokenize(caption) if w in SHAPES]
            assert len(shape_words) == len(pattern.findall(caption))  # every shape word has its colour
