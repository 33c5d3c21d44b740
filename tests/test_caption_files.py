"""``capkit caption`` over many files: folders and lists, batches, JSON Lines/CSV/COCO output that resumes,
unreadable images reported and skipped; caption, visualize and evaluate agree; decoding defaults to the model's."""
from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest

from capkit.cli import caption as caption_cli
from capkit.cli import evaluate as evaluate_cli
from capkit.cli import train as train_cli
from capkit.cli import visualize as visualize_cli
from capkit.data import load_split
from capkit.engine import RunDir
from capkit.errors import DataError
from capkit.evaluation.results import CaptionFileWriter, read_caption_rows
from capkit.pretrained import TrainedCaptioner
from capkit.recipes.captioning import caption_files, collect_images
from toys import TINY_SHAPES_CONFIG

SHAPES = {"name": "shapes", "num_train": 12, "num_val": 4, "num_test": 4, "image_size": 64}


@pytest.fixture(scope="module")
def run(tiny_run) -> RunDir:
    return tiny_run  # conftest's shared tiny run: these tests only read it


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The 4 validation images as PNG files (lossless: the same pixels as the dataset's), two in a sub-folder,
    and one file that is no image."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i, record in enumerate(load_split(SHAPES, "val").records):
        record.open().save(root / ("sub" if i >= 2 else ".") / f"{record.image_id}.png")
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "notes.md").write_text("ignored: no image extension")
    return root


def rows(path: Path, fmt: str | None = None) -> list[dict]:
    return read_caption_rows(path, fmt)


def test_folders_are_searched_recursively_and_lists_are_read(folder, tmp_path):
    files = collect_images([folder])
    assert [f.image_id for f in files] == ["broken.jpg", "shapes_val_00000.png", "shapes_val_00001.png",
                                           "sub/shapes_val_00002.png", "sub/shapes_val_00003.png"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two of them\n{folder / 'shapes_val_00001.png'}\n\n{folder / 'sub/shapes_val_00003.png'}\n")
    assert [f.path for f in collect_images([listing])] == [folder / "shapes_val_00001.png",
                                                           folder / "sub/shapes_val_00003.png"]
    assert len(collect_images([folder, folder / "shapes_val_00000.png"])) == 5  # the same file once
    (tmp_path / "shapes_val_00000.png").write_bytes((folder / "shapes_val_00000.png").read_bytes())
    with pytest.raises(DataError, match="two images have the id 'shapes_val_00000.png'"):
        collect_images([folder, tmp_path / "shapes_val_00000.png"])
    with pytest.raises(DataError, match="no such image file or folder: .*nowhere.jpg"):
        collect_images([tmp_path / "nowhere.jpg"])
    listing.write_text("missing.png\n")
    with pytest.raises(DataError, match=r"list.txt:1: no such image file 'missing.png'"):
        collect_images([listing])


def test_a_folder_to_jsonl_reports_the_unreadable_image_and_resumes(run, folder, tmp_path, caplog):
    out = tmp_path / "caps.jsonl"
    args = ["--checkpoint", str(run.best), "--device", "cpu", "--batch-size", "3", str(folder), "--output", str(out)]
    with caplog.at_level(logging.INFO):
        assert caption_cli.main(args) == 0
    assert "skipped " + str(folder / "broken.jpg") in caplog.text
    assert "captioned 4 images into" in caplog.text and "1 unreadable (listed above)" in caplog.text
    first = rows(out)
    assert [r["image_id"] for r in first] == ["shapes_val_00000.png", "shapes_val_00001.png",
                                              "sub/shapes_val_00002.png", "sub/shapes_val_00003.png"]
    assert all(r["caption"] and isinstance(r["score"], float) and Path(r["file"]).is_file() for r in first)
    # interrupted after the first image, in the middle of writing the second line
    text = out.read_text().splitlines(keepends=True)
    out.write_text(text[0] + text[1][:10])
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert caption_cli.main(args) == 0
    assert "already has 1 of the 5 images: captioning the other 4" in caplog.text
    assert rows(out) == first  # the cut line replaced, nothing twice
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert caption_cli.main(args) == 0
    assert "captioned 0 images" in caplog.text and "4 already there" in caplog.text and rows(out) == first


@pytest.mark.parametrize("fmt, name", [("csv", "caps.csv"), ("coco", "caps.json")])
def test_csv_and_coco_outputs_hold_the_same_captions_and_resume(run, folder, tmp_path, fmt, name):
    model = TrainedCaptioner.from_checkpoint(run.best)
    files = [f for f in collect_images([folder]) if f.image_id != "broken.jpg"]
    expected = {r["image_id"]: r["caption"] for r in rows(_jsonl(model, files, tmp_path))}
    out = tmp_path / name
    caption_files(model, files[:2], output=out, progress=False)
    if fmt == "csv":  # interrupted while writing a third row
        out.write_text(out.read_text() + "sub/shapes_val_00002.png,x,a cut capt")
    summary = caption_files(model, files, output=out, progress=False)
    assert (summary.already_done, summary.captioned) == (2, 2)
    assert {r["image_id"]: r["caption"] for r in rows(out)} == expected
    if fmt == "csv":
        with out.open(newline="") as f:
            assert next(csv.reader(f)) == ["image_id", "file", "caption", "score"]
    else:
        assert json.loads(out.read_text()) == [{"image_id": k, "caption": v} for k, v in expected.items()]


def _jsonl(model, files, tmp_path) -> Path:
    out = tmp_path / "reference.jsonl"
    caption_files(model, files, output=out, progress=False)
    return out


def test_batches_of_any_size_and_any_workers_give_the_same_captions_and_figures_are_written(run, folder, tmp_path):
    model = TrainedCaptioner.from_checkpoint(run.best)
    files = [f for f in collect_images([folder]) if f.image_id != "broken.jpg"]
    by_size = {}
    for size, workers in ((1, 0), (4, 2)):  # in this process, and read by two worker processes
        seen = []
        caption_files(model, files, batch_size=size, on_result=lambda f, r: seen.append(r.caption), progress=False,
                      attention_out=tmp_path / f"figures{size}", workers=workers)
        by_size[size] = seen
    assert by_size[1] == by_size[4]
    assert sorted(p.name for p in (tmp_path / "figures1").iterdir()) == [
        "shapes_val_00000_attention.png", "shapes_val_00001_attention.png",
        "sub__shapes_val_00002_attention.png", "sub__shapes_val_00003_attention.png"]


def test_caption_visualize_and_evaluate_give_the_same_caption(run, folder, tmp_path, capsys, caplog):
    image = folder / "shapes_val_00000.png"
    assert caption_cli.main(["--checkpoint", str(run.best), "--device", "cpu", str(image)]) == 0
    captioned = capsys.readouterr().out.strip().split("\t")[1]
    assert visualize_cli.main([str(image), "--checkpoint", str(run.best), "--out", str(tmp_path / "v.png"),
                               "--device", "cpu"]) == 0
    visualized = capsys.readouterr().out.splitlines()[0]
    with caplog.at_level(logging.INFO):
        assert evaluate_cli.main(["--checkpoint", str(run.best), "--split", "val", "--metrics", "sacrebleu",
                                  "--tokenizer", "none", "--per-image", str(tmp_path / "per.json"),
                                  "--device", "cpu"]) == 0
    assert "decoding: beam 2, max_len 8, length_penalty 0.0 (the model's settings)" in caplog.text
    per_image = json.loads((tmp_path / "per.json").read_text())
    evaluated = next(v for k, v in _items(per_image) if k == "shapes_val_00000")
    assert captioned == visualized == evaluated == TrainedCaptioner.from_checkpoint(run.best).caption(image).caption


def _items(per_image):
    """(image id, caption) pairs of a per-image file."""
    records = per_image if isinstance(per_image, list) else per_image.get("images", per_image)
    if isinstance(records, dict):
        return [(k, v["caption"]) for k, v in records.items()]
    return [(r["image_id"], r["caption"]) for r in records]


def test_flags_override_the_models_decoding_and_say_so(run, folder, caplog, capsys):
    with caplog.at_level(logging.INFO):
        assert caption_cli.main(["--checkpoint", str(run.best), "--device", "cpu", "--beam", "1",
                                 str(folder / "shapes_val_00000.png")]) == 0
    assert "decoding: beam 1, max_len 8, length_penalty 0.0 (flags over the model's settings)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert caption_cli.main(["--checkpoint", str(run.best), "--device", "cpu", "--no-repeat-ngram-size", "3",
                                 str(folder / "shapes_val_00000.png")]) == 0
    assert ("decoding: beam 2, max_len 8, length_penalty 0.0, no_repeat_ngram_size 3 (flags over the model's "
            "settings)") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert caption_cli.main(["--checkpoint", str(run.best), "--device", "cpu", "--suppress-unk",
                                 str(folder / "shapes_val_00000.png")]) == 0
    assert "decoding: beam 2, max_len 8, length_penalty 0.0, suppress_unk (flags over the model's settings)" in caplog.text
    assert f"model: {run.best} (test_efficientnet + bahdanau + show_attend_tell)" in caplog.text


def test_predictions_from_caption_are_scored_against_a_dataset_split(run, folder, tmp_path, capsys):
    out = tmp_path / "caps.jsonl"
    files = [f for f in collect_images([folder]) if "/" not in f.image_id and f.image_id != "broken.jpg"]
    model = TrainedCaptioner.from_checkpoint(run.best)
    caption_files(model, files, output=out, progress=False)
    # ids that match the dataset's (shapes ids have no suffix)
    renamed = tmp_path / "renamed.jsonl"
    with CaptionFileWriter(renamed) as writer:
        writer.write([{**r, "image_id": r["image_id"].removesuffix(".png")} for r in rows(out)])
    data = [f"{k}={v}" for k, v in SHAPES.items()]
    assert evaluate_cli.main(["--predictions", str(renamed), "--split", "val", "--data", *data,
                              "--metrics", "sacrebleu", "--tokenizer", "none"]) == 0
    assert "2 images: " in capsys.readouterr().out
    assert evaluate_cli.main(["--predictions", str(out), "--split", "val", "--data", *data,
                              "--metrics", "sacrebleu", "--tokenizer", "none"]) == 2
    assert "2 of 2 images have no references in shapes val split (first: 'shapes_val_00000.png')" in \
        capsys.readouterr().err


def test_the_readmes_folder_example_config_and_caption_file_work_together(tmp_path):
    """configs/folder.yaml with docs/examples/captions.csv: every split of the example loads."""
    import shutil

    from PIL import Image

    from capkit.config import load_config

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path / "my_photos"
    root.mkdir()
    shutil.copy(repo / "docs" / "examples" / "captions.csv", root / "captions.csv")
    with open(root / "captions.csv", newline="") as f:
        for row in csv.DictReader(f):
            (root / row["image"]).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), "blue").save(root / row["image"])
    cfg = load_config(repo / "configs" / "folder.yaml", [f"data.dataset.root={root}"])
    assert cfg.model.encoder.weights == "efficientnet-lite0-pypi" and cfg.eval.tokenizer == "python"
    sizes = {split: len(load_split(dict(cfg.data.dataset), split).records) for split in ("train", "val", "test")}
    assert sizes == {"train": 3, "val": 1, "test": 1}
    assert load_split(dict(cfg.data.dataset), "train").records[1].captions == [
        "two children build a sandcastle", "a boy and a girl play in the sand, a bucket beside them"]


@pytest.mark.parametrize("kind", ["folder", "under a file", "figures under a file"])
def test_an_output_that_cannot_be_written_is_refused_before_any_image_is_captioned(run, folder, tmp_path, capsys,
                                                                                 monkeypatch, kind):
    from capkit.pretrained.model import TrainedCaptioner as Model

    captioned = []
    monkeypatch.setattr(Model, "caption_pictures", lambda self, *a, **k: captioned.append(a) or [])
    (tmp_path / "a_file").write_text("x")
    output, extra = {
        "folder": (tmp_path, []),
        "under a file": (tmp_path / "a_file" / "caps.jsonl", []),
        "figures under a file": (tmp_path / "caps.jsonl", ["--attention-out", str(tmp_path / "a_file" / "figs")]),
    }[kind]
    assert caption_cli.main(["--checkpoint", str(run.best), "--device", "cpu", str(folder), "--output", str(output),
                             *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capkit caption: error: ") and err.count("\n") == 1, err
    assert {"folder": "is a folder: give a file for the captions",
            "under a file": "caps.jsonl: cannot write the captions there (",
            "figures under a file": "figs: cannot hold the attention figures ("}[kind] in err
    assert captioned == [] and not (tmp_path / "caps.jsonl").exists()


KILLED_RUN = """
import os, signal, sys
from capkit.pretrained import TrainedCaptioner
from capkit.recipes.captioning import caption_files, collect_images

done = []
def kill_after(n):
    def on_result(image, result):
        done.append(image)
        if len(done) == n:  # as a kill -9 would: no clean-up, no flush beyond what was written
            os.kill(os.getpid(), signal.SIGKILL)
    return on_result

model = TrainedCaptioner.from_checkpoint(sys.argv[1])
caption_files(model, collect_images([sys.argv[2]]), output=sys.argv[3], batch_size=int(sys.argv[4]),
              on_result=kill_after(int(sys.argv[5])), progress=False)
"""


@pytest.mark.parametrize("name", ["caps.jsonl", "caps.csv", "caps.json"])
def test_a_run_killed_after_some_images_resumes_with_each_image_exactly_once(run, folder, tmp_path, name):
    import subprocess
    import sys

    out = tmp_path / name
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(run.best), str(folder), str(out), "1", "3"],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    # batches of one are written before their images are reported: the killed run kept 3 of the 4
    assert len(rows(out)) == 3
    model = TrainedCaptioner.from_checkpoint(run.best)
    summary = caption_files(model, collect_images([folder]), output=out, progress=False)
    assert (summary.already_done, summary.captioned, len(summary.unreadable)) == (3, 1, 1)
    ids = [r["image_id"] for r in rows(out)]
    assert sorted(ids) == ["shapes_val_00000.png", "shapes_val_00001.png", "sub/shapes_val_00002.png",
                           "sub/shapes_val_00003.png"]


def test_chunks_read_by_the_workers_are_joined_into_full_batches(run, folder, monkeypatch):
    """Workers send small chunks (LOADER_CHUNK); the model still gets batches of batch_size readable images."""
    from capkit.recipes import captioning

    monkeypatch.setattr(captioning, "LOADER_CHUNK", 2)
    model = TrainedCaptioner.from_checkpoint(run.best)
    sizes, original = [], model.caption_pictures

    def recording(pictures, **kwargs):
        sizes.append(len(pictures))
        return original(pictures, **kwargs)

    monkeypatch.setattr(model, "caption_pictures", recording)
    seen = []
    summary = caption_files(model, collect_images([folder]), batch_size=3, workers=1, progress=False,
                            on_result=lambda f, r: seen.append(f.image_id), on_unreadable=lambda f, why: None)
    assert sizes == [3, 1] and len(summary.unreadable) == 1  # broken.jpg, first in the folder, left out
    assert seen == ["shapes_val_00000.png", "shapes_val_00001.png", "sub/shapes_val_00002.png",
                    "sub/shapes_val_00003.png"]


def test_resume_keeps_a_complete_last_line_and_refuses_a_file_it_did_not_write(run, folder, tmp_path):
    model = TrainedCaptioner.from_checkpoint(run.best)
    files = [f for f in collect_images([folder]) if f.image_id != "broken.jpg"]
    out = tmp_path / "caps.jsonl"
    caption_files(model, files[:2], output=out, progress=False)
    out.write_text(out.read_text().rstrip("\n"))  # an editor dropped the final newline: both lines are whole
    summary = caption_files(model, files, output=out, progress=False)
    assert (summary.already_done, summary.captioned) == (2, 2)
    assert sorted(r["image_id"] for r in rows(out)) == sorted(f.image_id for f in files)
    for name, content in (("notes.txt", b"my notes, one line"), ("photo.jsonl", b"\x89PNG\r\n\x1a\n\x00\xff")):
        mine = tmp_path / name
        mine.write_bytes(content)
        with pytest.raises(DataError, match=rf"{name}"):
            caption_files(model, files, output=mine, output_format="jsonl", progress=False)
        assert mine.read_bytes() == content  # untouched


def test_two_images_that_would_share_a_figure_name_are_refused_before_captioning(run, tmp_path):
    from PIL import Image

    for name in ("a.jpg", "a.png"):
        Image.new("RGB", (20, 20), "red").save(tmp_path / name)
    model = TrainedCaptioner.from_checkpoint(run.best)
    with pytest.raises(DataError, match=r"a\.jpg and .*a\.png would share the attention figure a_attention\.png"):
        caption_files(model, collect_images([tmp_path / "a.jpg", tmp_path / "a.png"]),
                      attention_out=tmp_path / "figs", progress=False)


def test_a_large_photo_is_captioned_from_all_its_pixels_and_kept_small_for_its_figure(run, tmp_path):
    from PIL import Image

    from capkit.recipes.captioning import FIGURE_SIDE

    big = tmp_path / "big.png"
    Image.effect_noise((3000, 2000), 60).convert("RGB").save(big)
    model = TrainedCaptioner.from_checkpoint(run.best)
    seen = []
    caption_files(model, collect_images([big]), on_result=lambda f, r: seen.append(r), progress=False, workers=1)
    [result] = seen
    assert result.image.size == (FIGURE_SIDE, round(FIGURE_SIDE * 2 / 3))  # 1024 x 683
    assert result.caption == model.caption(big).caption and result.score == pytest.approx(model.caption(big).score)
    assert result.save_figure(tmp_path / "fig.png").is_file()


def test_the_n_best_list_comes_best_first_and_goes_to_json_lines(run, folder, tmp_path, capsys):
    model = TrainedCaptioner.from_checkpoint(run.best)  # beam 2
    image = folder / "shapes_val_00000.png"
    result = model.caption(image, n_best=2)
    assert len(result.n_best) == 2 and result.n_best[0] == (result.caption, result.score)
    assert result.n_best[0][1] >= result.n_best[1][1]
    assert model.caption(image).n_best == []
    with pytest.raises(ValueError, match=r"n_best must be a whole number from 1 to the beam size \(2\), got 3"):
        model.caption(image, n_best=3)
    out = tmp_path / "caps.jsonl"
    assert caption_cli.main(["--checkpoint", str(run.best), "--device", "cpu", str(image), "--n-best", "2",
                             "--output", str(out)]) == 0
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["n_best"] == [{"caption": c, "score": round(v, 4)} for c, v in result.n_best]
    assert caption_cli.main(["--checkpoint", str(run.best), "--device", "cpu", str(image), "--n-best", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{image}\t{result.caption}", f"{image}\t#2 {result.n_best[1][0]} ({result.n_best[1][1]:.3f})"]
    assert caption_cli.main(["--checkpoint", str(run.best), "--device", "cpu", str(image), "--n-best", "3"]) == 2
    assert "--n-best 3 is more than the beam size 2" in capsys.readouterr().err
    assert caption_cli.main(["--checkpoint", str(run.best), "--device", "cpu", str(image), "--n-best", "2",
                             "--output", str(tmp_path / "caps.csv")]) == 2
    assert "an n-best list needs JSON Lines output" in capsys.readouterr().err


def test_a_worker_count_out_of_range_is_one_short_line(capsys):
    with pytest.raises(SystemExit):
        caption_cli.build_parser().parse_args(["x.jpg", "--workers", "99"])
    assert "argument --workers: must be from 0 to 64, got 99" in capsys.readouterr().err


def test_a_csv_row_cut_at_its_carriage_return_is_captioned_again_and_no_finished_row_is_lost(run, folder, tmp_path):
    """csv writes rows ending in \\r\\n; a copy that lost the final \\n (``$(...)`` in a shell) ends in \\r: the
    reader and the writer both treat that last row as unfinished, so it is captioned again and the others stay."""
    model = TrainedCaptioner.from_checkpoint(run.best)
    files = [f for f in collect_images([folder]) if f.image_id != "broken.jpg"]
    out = tmp_path / "caps.csv"
    caption_files(model, files[:3], output=out, progress=False)
    out.write_bytes(out.read_bytes().removesuffix(b"\n"))
    summary = caption_files(model, files, output=out, progress=False)
    assert (summary.already_done, summary.captioned) == (2, 2)
    assert sorted(r["image_id"] for r in rows(out)) == sorted(f.image_id for f in files)


def test_a_file_of_another_folder_with_an_id_the_output_has_is_refused_not_skipped(run, folder, tmp_path):
    model = TrainedCaptioner.from_checkpoint(run.best)
    first, second = tmp_path / "2023", tmp_path / "2024"
    first.mkdir(), second.mkdir()
    pngs = sorted(folder.glob("*.png"))
    shutil.copy(pngs[0], first / "IMG_0001.png")
    shutil.copy(pngs[1], second / "IMG_0001.png")
    out = tmp_path / "caps.jsonl"
    caption_files(model, collect_images([first]), output=out, progress=False)
    before = out.read_bytes()
    with pytest.raises(DataError, match=r"caps.jsonl already has the image id 'IMG_0001.png', from .*2023/IMG_0001.png; "
                                        r".*2024/IMG_0001.png has the same id: caption it into another output file"):
        caption_files(model, collect_images([second]), output=out, progress=False)
    assert out.read_bytes() == before
    # the same file again is a resume, whatever path names it
    assert caption_files(model, collect_images([first]), output=out, progress=False).already_done == 1


def test_files_with_a_byte_order_mark_are_read_and_files_that_are_not_utf8_name_their_line(tmp_path):
    from capkit.errors import CaptionFileError
    from capkit.evaluation import load_predictions, load_references

    (tmp_path / "pred.csv").write_text("\ufeffimage_id,caption\n1,a dog runs\n", encoding="utf-8")
    (tmp_path / "refs.json").write_text('\ufeff{"1": ["a dog"]}', encoding="utf-8")
    assert load_predictions(tmp_path / "pred.csv") == {"1": "a dog runs"}
    assert load_references(tmp_path / "refs.json") == {"1": ["a dog"]}
    (tmp_path / "latin.csv").write_bytes("image_id,caption\n1,a dog\n2,un caf\u00e9\n".encode("latin-1"))
    with pytest.raises(CaptionFileError, match=r"latin.csv:3: not UTF-8 text \(invalid .* at byte \d+\); save the "
                                               r"file as UTF-8"):
        load_predictions(tmp_path / "latin.csv")
