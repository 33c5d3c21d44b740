"""Bad caption files are refused with one error that names the file and line (or record) and what is wrong;
nothing is dropped silently. One case per malformation, for every reader."""
from __future__ import annotations

import json
import logging
import re
import shutil
import time

import pytest
import torch
from PIL import Image

from capkit.cli import ablate as ablate_cli
from capkit.cli import caption as caption_cli
from capkit.cli import evaluate as evaluate_cli
from capkit.cli import train as train_cli
from capkit.cli import visualize as visualize_cli
from capkit.errors import CaptionFileError, DataError
from capkit.registry import DATASETS
from toys import MODEL, TINY_SHAPES_CONFIG, write_checkpoint

CSV_CASES = {
    "extra field (an unquoted comma)": ("image,caption,split\na.jpg,a car, red,train\n", r":2: 4 fields where the header has 3 .*quote a caption that holds a comma"),
    "missing field": ("image,caption,split\na.jpg,a car\n", r":2: 2 fields where the header has 3"),
    "empty caption": ("image,caption,split\na.jpg,,train\n", r":2: a caption must be a non-empty string, got ''"),
    "blank caption": ("image,caption,split\na.jpg,   ,train\n", r":2: a caption must be a non-empty string"),
    "unknown split": ("image,caption,split\na.jpg,a car,tran\n", r":2: split 'tran' is not one of train, val, test"),
    "no split": ("image,caption,split\na.jpg,a car,\n", r":2: no 'split' field"),
    "no image": ("image,caption,split\n,a car,train\n", r":2: needs 'image' and 'caption'"),
    "wrong header": ("file,text\na.jpg,x\n", r":2: needs 'image' and 'caption'"),
    "empty file": ("", r":1: an empty file, where the header 'image,caption\[,split\]' belongs"),
    "no row of the split": ("image,caption,split\na.jpg,a car,val\n", r"no captions for the train split; the file has the splits val"),
    "not UTF-8": (b"image,caption,split\na.jpg,caf\xe9,train\n", r"not UTF-8 text"),
    # a stray quote: the lenient reader merged the lines up to the next quote into one caption
    "stray quote, later quoted captions": (
        'image,caption,split\na.jpg,a car,train\nb.jpg,"a dog,train\nc.jpg,a cat,train\nd.jpg,"a bird",train\n',
        r":3: ',' expected after '\"'; a quote \(\"\) that opens a field must close it just before the next comma"),
    "stray quote, two columns (a per-split file)": (
        'image,caption\nb.jpg,"a dog\nc.jpg,a cat\nd.jpg,"a bird"\n',
        r":2: ',' expected after '\"'"),
    "quoted field running over lines": ('image,caption\na.jpg,"a dog\nb.jpg,a cat"\n',
                                        r":2: a quoted field runs on to line 3"),
    "unterminated quote at the end": ('image,caption,split\na.jpg,a car,train\nb.jpg,"a dog,train\n',
                                      r":3: unexpected end of data"),
    "quote then text": ('image,caption,split\na.jpg,"big" dog,train\n', r":2: ',' expected after '\"'"),
}
JSONL_CASES = {
    "captions is a string": ('{"image": "a.jpg", "captions": "a dog", "split": "train"}\n', r":1: 'captions' must be a non-empty list of strings, got 'a dog'"),
    "empty captions list": ('{"image": "a.jpg", "captions": [], "split": "train"}\n', r":1: 'captions' must be a non-empty list"),
    "caption not a string": ('{"image": "a.jpg", "caption": 3, "split": "train"}\n', r":1: a caption must be a non-empty string, got 3"),
    "empty caption in a list": ('{"image": "a.jpg", "captions": ["a dog", ""], "split": "train"}\n', r":1: a caption must be a non-empty string, got ''"),
    "both caption fields": ('{"image": "a.jpg", "caption": "x", "captions": ["y"], "split": "train"}\n', r":1: has both 'caption' and 'captions'"),
    "image not a string": ('{"image": 7, "caption": "x", "split": "train"}\n', r":1: 'image' must be a file name"),
    "record not an object": ('["a.jpg", "x"]\n', r":1: a record must be a JSON object, got list"),
    "invalid JSON": ('{"image": "a.jpg", "caption": "x"\n', r":1: invalid JSON"),
    "second line bad": ('{"image": "a.jpg", "caption": "x", "split": "train"}\n{"image": "b.jpg", "split": "train"}\n', r":2: needs 'image' and 'caption'"),
    "unknown split": ('{"image": "a.jpg", "caption": "x", "split": "validation"}\n', r":1: split 'validation' is not one of"),
}


def build_folder(tmp_path, name: str, content: str | bytes, split: str = "train"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return DATASETS.build({"name": "folder", "root": str(tmp_path), "annotations": name}, split=split)


@pytest.mark.parametrize("content, message", CSV_CASES.values(), ids=CSV_CASES.keys())
def test_a_malformed_csv_row_is_refused_naming_file_and_line(tmp_path, content, message):
    with pytest.raises(CaptionFileError, match=rf"captions\.csv{message}" if message.startswith(":") else message):
        build_folder(tmp_path, "captions.csv", content)


@pytest.mark.parametrize("content, message", JSONL_CASES.values(), ids=JSONL_CASES.keys())
def test_a_malformed_json_lines_record_is_refused_naming_file_and_line(tmp_path, content, message):
    with pytest.raises(CaptionFileError, match=rf"captions\.jsonl{message}"):
        build_folder(tmp_path, "captions.jsonl", content)


def test_duplicates_are_kept_once_and_counted_and_a_bom_is_fine(tmp_path, caplog):
    content = "\ufeffimage,caption,split\na.jpg,a car,train\na.jpg,a car,train\na.jpg,\"a car, red\",train\nb.jpg,x,val\n"
    with caplog.at_level(logging.INFO):
        data = build_folder(tmp_path, "captions.csv", content)
    assert [(r.image_id, r.captions) for r in data.records] == [("a.jpg", ["a car", "a car, red"])]
    assert "folder train: 1 captions given twice for one image left out" in caplog.text


def coco(tmp_path, doc) -> None:
    (tmp_path / "annotations").mkdir(exist_ok=True)
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(doc))
    DATASETS.build({"name": "coco", "root": str(tmp_path)}, split="val")


IMAGE = {"id": 1, "file_name": "a.jpg"}
COCO_CASES = {
    "no annotations": ({"images": [IMAGE]}, r"captions_val2017\.json: has no 'annotations' field"),
    "annotation without caption": ({"images": [IMAGE], "annotations": [{"image_id": 1}]},
                                   r"annotations\[0\]: has no 'caption' field"),
    "annotation without image_id": ({"images": [IMAGE], "annotations": [{"caption": "x"}]},
                                    r"annotations\[0\]: has no 'image_id' field"),
    "empty caption": ({"images": [IMAGE], "annotations": [{"image_id": 1, "caption": " "}]},
                      r"annotations\[0\]: a caption must be a non-empty string"),
    "image without file_name": ({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "x"}]},
                                r"images\[0\]: has no 'file_name' field"),
    "image listed twice": ({"images": [IMAGE, IMAGE], "annotations": [{"image_id": 1, "caption": "x"}]},
                           r"images\[1\]: image id 1 is listed twice"),
    "annotations not a list": ({"images": [IMAGE], "annotations": {"image_id": 1}},
                               r"'annotations' must be a list"),
}


@pytest.mark.parametrize("doc, message", COCO_CASES.values(), ids=COCO_CASES.keys())
def test_a_malformed_coco_file_is_refused_naming_the_record(tmp_path, doc, message):
    with pytest.raises(CaptionFileError, match=message):
        coco(tmp_path, doc)


def test_invalid_coco_json_names_the_line(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(CaptionFileError, match=r"captions_val2017\.json:2: invalid JSON"):
        DATASETS.build({"name": "coco", "root": str(tmp_path)}, split="val")


KARPATHY_IMAGE = {"filename": "a.jpg", "split": "val", "sentences": [{"raw": "a dog"}]}
KARPATHY_CASES = {
    "no filename": ({"split": "val", "sentences": []}, r"images\[0\]: has no 'filename' field"),
    "no split": ({"filename": "a.jpg", "sentences": []}, r"images\[0\]: has no 'split' field"),
    "unknown split": ({**KARPATHY_IMAGE, "split": "dev"}, r"images\[0\]: split 'dev' is not one of train, val, test, restval"),
    "sentence without raw": ({**KARPATHY_IMAGE, "sentences": [{"tokens": ["a"]}]}, r"images\[0\]\.sentences\[0\]: has no 'raw' field"),
    "empty raw": ({**KARPATHY_IMAGE, "sentences": [{"raw": ""}]}, r"images\[0\]\.sentences\[0\]: a caption must be a non-empty string"),
    "no sentences": ({**KARPATHY_IMAGE, "sentences": []}, r"images\[0\]: no sentences"),
}


def test_a_karpathy_image_listed_twice_is_refused(tmp_path):
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": [KARPATHY_IMAGE, KARPATHY_IMAGE]}))
    with pytest.raises(CaptionFileError, match=r"images\[1\]: image a\.jpg is listed twice \(first at images\[0\]\)"):
        DATASETS.build({"name": "karpathy", "root": str(tmp_path)}, split="val")


@pytest.mark.parametrize("image, message", KARPATHY_CASES.values(), ids=KARPATHY_CASES.keys())
def test_a_malformed_karpathy_file_is_refused_naming_the_image(tmp_path, image, message):
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": [image]}))
    with pytest.raises(CaptionFileError, match=message):
        DATASETS.build({"name": "karpathy", "root": str(tmp_path)}, split="val")


def flickr8k(tmp_path, tokens: bytes, names: str = "a.jpg\n"):
    text = tmp_path / "Flickr8k_text"
    text.mkdir(exist_ok=True)
    (tmp_path / "Flicker8k_Dataset").mkdir(exist_ok=True)
    (text / "Flickr8k.token.txt").write_bytes(tokens)
    (text / "Flickr_8k.devImages.txt").write_text(names)
    return DATASETS.build({"name": "flickr8k", "root": str(tmp_path)}, split="val")


FLICKR_CASES = {
    "not UTF-8": (b"a.jpg#0\ta dog\na.jpg#1\tcaf\xe9\n", "a.jpg\n", r"Flickr8k\.token\.txt:2: not UTF-8 text"),
    "no tab": (b"a.jpg#0 a dog\n", "a.jpg\n", r"Flickr8k\.token\.txt:1: expected 'name\.jpg#N<TAB>caption'"),
    "empty caption": (b"a.jpg#0\t \n", "a.jpg\n", r"Flickr8k\.token\.txt:1: a caption must be a non-empty string"),
    "image listed twice": (b"a.jpg#0\ta dog\n", "a.jpg\na.jpg\n", r"devImages\.txt: 1 images are listed more than once"),
    "image without caption": (b"a.jpg#0\ta dog\n", "a.jpg\nb.jpg\n", r"devImages\.txt: 1 images have no caption"),
}


@pytest.mark.parametrize("tokens, names, message", FLICKR_CASES.values(), ids=FLICKR_CASES.keys())
def test_a_malformed_flickr8k_file_is_refused_naming_file_and_line(tmp_path, tokens, names, message):
    with pytest.raises(CaptionFileError, match=message):
        flickr8k(tmp_path, tokens, names)



# --- settings that used to fail after an epoch fail before the first step ---------------------------------

SETTING_CASES = {
    "negative batch size": (["train.batch_size=-4"], r"train\.batch_size is -4; it must be at least 1"),
    "zero learning rate": (["train.lr=0"], r"train\.lr is 0\.0; it must be greater than 0"),
    "beam size 0": (["eval.beam_size=0"], r"eval\.beam_size is 0; it must be at least 1"),
    "negative max_len": (["eval.max_len=-1"], r"eval\.max_len is -1; it must be at least 1"),
    "label smoothing 1": (["train.label_smoothing=1.0"], r"train\.label_smoothing is 1\.0; it must be in \[0, 1\)"),
    "ema decay 1": (["train.ema_decay=1"], r"train\.ema_decay is 1\.0; it must be in \(0, 1\), e\.g\. 0\.999"),
    "augmented views without augmentation": (["data.augment_views=2"],
                                             r"data\.augment_views is 2, but data\.augment is false: the views are "
                                             r"augmented copies of the images; set data\.augment=true"),
    "augmented views without a cache": (["data.augment=true", "data.augment_views=2", "data.cache_features=false"],
                                        r"data\.augment_views is 2, but data\.cache_features is false: the views "
                                        r"are cached features"),
    "augmented views of a trained encoder": (["data.augment=true", "data.augment_views=2",
                                              "model.encoder.finetune=all"],
                                             r"data\.augment_views is 2, but model\.encoder has no frozen part "
                                             r"capkit can cache"),
    "fine-tuning from an epoch an encoder with nothing to train": (["train.finetune_encoder_from_epoch=1"],
                                                                   r"train\.finetune_encoder_from_epoch is 1, but "
                                                                   r"model\.encoder\.finetune is none"),
    "negative augmented views": (["data.augment_views=-1"], r"data\.augment_views is -1; it must be at least 0"),
    "no captions per image": (["data.captions_per_image=0"], r"data\.captions_per_image is 0; it must be at least 1"),
    "a batch of part of an image's captions": (["data.captions_per_image=5"],
                                               r"train\.batch_size is 16, but data\.captions_per_image is 5: a batch "
                                               r"holds 5 captions of each of its images; set train\.batch_size to a "
                                               r"multiple of 5 \(e\.g\. 15\)"),
    "captions grouped over augmented views": (["data.captions_per_image=4", "data.augment=true",
                                               "data.augment_views=2"],
                                              r"data\.captions_per_image is 4 and data\.augment_views is 2: the two "
                                              r"cannot be combined yet"),
    "fp16 on the CPU": (["train.amp=fp16", "train.device=cpu"],
                        r"train\.amp=fp16 needs a CUDA device, this runs on cpu; use train\.amp=bf16 or none"),
    "unknown scheduler": (["train.scheduler=step"], r"train\.scheduler is 'step'; choose one of plateau, cosine, warmup_cosine, none"),
    "unknown tokenizer": (["eval.tokenizer=spacy"], r"eval\.tokenizer is 'spacy'; choose one of ptb, python, none"),
    "no metrics": (["eval.metrics=[]"], r"eval\.metrics is empty"),
    "selection metric not reported": (["train.early_stop_metric=cider"],
                                      r"train\.early_stop_metric is 'cider', but eval\.metrics \['sacrebleu'\] report only sacrebleu"),
    "unknown metric": (["eval.metrics=[blue]"], r"unknown metric 'blue'"),
    "wrong decoder keyword": (["model.decoder.hiden_dim=8"], r"decoder 'show_attend_tell' does not accept 'hiden_dim' \(did you mean 'hidden_dim'\?\)"),
    "unknown attention": (["model.attention.name=bahdanu"], r"unknown attention 'bahdanu'\. Did you mean 'bahdanau'"),
    "a vocabulary of almost no words": (["data.vocab_min_count=1000"],
                                        r"the vocabulary \(data\.vocab_min_count=1000, data\.vocab_max_size=5000\) "
                                        r"has 0 words: 100% of the training captions' words would be <unk>; lower "
                                        r"vocab_min_count or raise vocab_max_size"),
    "negative hidden size": (["model.decoder.hidden_dim=-4"],
                             r"decoder 'show_attend_tell': hidden_dim must be a positive size, got -4"),
    "zero attention size": (["model.attention.attn_dim=0"], r"attention 'bahdanau': attn_dim must be a positive size"),
    "a flag that is not true or false": (["model.decoder.tie_embeddings=maybe"],
                                         r"decoder 'show_attend_tell': tie_embeddings must be true or false, got 'maybe'"),
    "dropout over 1": (["model.decoder.dropout=1.5"], r"decoder 'show_attend_tell' cannot be built with .*dropout=1\.5"
                       r".*: dropout probability has to be between 0 and 1, but got 1\.5; check these settings"),
    "unknown timm model": (["model.encoder.model_name=nonexistent_net"],
                           r"encoder 'timm' cannot be built with model_name='nonexistent_net': Unknown model"),
    "infinite learning rate": (["train.lr=inf"], r"tiny\.yaml: train\.lr is inf; it must be a finite number"),
    "infinite weight decay": (["train.weight_decay=inf"], r"train\.weight_decay is inf; it must be a finite number"),
    "infinite grad_clip": (["train.grad_clip=inf"], r"train\.grad_clip is inf; it must be a finite number"),
    "NaN learning rate": (["train.lr=nan"], r"train\.lr is nan; it must be a finite number"),
    "infinite length penalty": (["eval.length_penalty=inf"],
                                r"eval\.length_penalty is inf; it must be a finite number"),
    "negative n-gram ban": (["eval.no_repeat_ngram_size=-2"], r"eval\.no_repeat_ngram_size is -2; it must be at least 0"),
    "infinite reward weight": (["train.scst_reward.cider=inf"],
                               r"train\.scst_reward\.cider is inf; it must be a finite number"),
    "NaN dropout (override text)": (["model.decoder.dropout=nan"],
                                    r"model\.decoder\.dropout is 'nan'; it must be a finite number"),
    "NaN dropout (YAML .nan)": (["model.decoder.dropout=.nan"],
                                r"model\.decoder\.dropout is nan; it must be a finite number"),
    "negative seed": (["train.seed=-5"], r"train\.seed is -5; it must be in \[0, 2\*\*32 - 1\]"),
    "seed past numpy's": (["train.seed=4294967296"], r"train\.seed is 4294967296; it must be in \[0, 2\*\*32 - 1\]"),
    "vocabulary of only special tokens": (["data.vocab_max_size=4"],
                                          r"data\.vocab_max_size is 4; it must be at least 5"),
    "a section set to a number": (["model=3"], r"command-line override: model is a section of settings \(encoder, "
                                               r"attention, decoder\), not 3; set its keys instead"),
    **{f"run_name {name}": ([f"train.run_name={name}"],
                            rf"train\.run_name is '{re.escape(name)}'; it must be a plain directory name inside "
                            rf"train\.output_dir")
       for name in (".", "..", "../escaped", "/abs/path", "a/b")},
}
if not torch.cuda.is_available():
    SETTING_CASES["cuda without CUDA"] = (["train.device=cuda"],
                                          r"device 'cuda' was asked for but CUDA is not available; use device=auto")


@pytest.mark.parametrize("overrides, message", SETTING_CASES.values(), ids=SETTING_CASES.keys())
def test_a_bad_setting_fails_in_seconds_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, overrides, message):
    monkeypatch.setenv("CAPKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_SHAPES_CONFIG)
    started = time.perf_counter()
    assert train_cli.main([str(config), "train.run_name=bad", *overrides]) == 2
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert err.startswith("capkit train: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert seconds < 10 and not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_metrics_that_need_java_fail_before_training_where_there_is_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on it
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_SHAPES_CONFIG)
    assert train_cli.main([str(config), "eval.metrics=[bleu,meteor]", "train.early_stop_metric=bleu4"]) == 2
    err = capsys.readouterr().err
    assert "metric 'meteor' and the PTB tokenizer (eval.tokenizer=ptb) run a Java program" in err
    assert "eval.tokenizer=python" in err and not (tmp_path / "runs").exists()


def test_an_evaluation_split_with_a_repeated_image_or_no_references_is_refused():
    from capkit.data.build import LoadedSplit
    from capkit.data.records import ImageRecord
    from capkit.recipes.train import check_eval_split

    class Named:
        name = "mine"

    with pytest.raises(DataError, match=r"mine val split: 1 images are listed more than once \(e\.g\. \['a'\]\)"):
        check_eval_split(LoadedSplit(Named(), [ImageRecord("a", ["x"]), ImageRecord("a", ["y"])]), "val")
    with pytest.raises(DataError, match=r"mine val split: 1 images have no reference caption"):
        check_eval_split(LoadedSplit(Named(), [ImageRecord("a", [])]), "val")
    with pytest.raises(DataError, match=r"mine val split: no images to evaluate on"):
        check_eval_split(LoadedSplit(Named(), []), "val")


# --- every tool: one line, status 2, the file named ------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    return write_checkpoint(tmp_path / "ckpt", MODEL)


def run_tool(main, args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_caption_refuses_a_file_that_is_no_image(tmp_path, checkpoint, capsys):
    (tmp_path / "notes.jpg").write_text("hello")
    err = run_tool(caption_cli.main, ["--checkpoint", str(checkpoint), "--device", "cpu", str(tmp_path / "notes.jpg")], capsys)
    assert err.startswith("capkit caption: error: cannot decode image") and "notes.jpg" in err


def test_caption_names_a_missing_image(tmp_path, checkpoint, capsys):
    err = run_tool(caption_cli.main, ["--checkpoint", str(checkpoint), str(tmp_path / "gone.jpg")], capsys)
    assert "no such image file" in err and "gone.jpg" in err


@pytest.mark.parametrize("damage", ["model", "state", "json"])
def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, checkpoint, capsys, damage):
    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    target = {"model": "model.safetensors", "state": "state.safetensors", "json": "state.json"}[damage]
    data = (checkpoint / target).read_bytes()
    (checkpoint / target).write_bytes(data[: len(data) // 2])  # cut short
    err = run_tool(caption_cli.main, ["--checkpoint", str(checkpoint), "--device", "cpu", str(tmp_path / "photo.png")], capsys)
    assert err.startswith(f"capkit caption: error: {checkpoint}: the checkpoint is damaged")


@pytest.mark.parametrize("edit, message", [
    (lambda doc: doc.update(state=[]), "the checkpoint is damaged (state.json holds no state mapping)"),
    (lambda doc: doc["state"]["config"].update(model=3), "its stored config or vocabulary is damaged (Merge error"),
    (lambda doc: doc["state"].update(vocab=7), "its stored config or vocabulary is damaged ('int' object"),
], ids=["state not a mapping", "config section of another type", "vocabulary not a list"])
def test_a_checkpoint_whose_state_json_has_the_wrong_structure_is_one_line(tmp_path, checkpoint, capsys, edit,
                                                                          message):
    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    doc = json.loads((checkpoint / "state.json").read_text())
    edit(doc)
    (checkpoint / "state.json").write_text(json.dumps(doc))
    err = run_tool(caption_cli.main, ["--checkpoint", str(checkpoint), "--device", "cpu", str(tmp_path / "photo.png")],
                   capsys)
    assert err.startswith(f"capkit caption: error: {checkpoint}: {message}"), err


@pytest.mark.parametrize("key, value, message", [
    ("beam_size", 0, "eval.beam_size is 0; it must be at least 1"),
    ("beam_size", -1, "eval.beam_size is -1; it must be at least 1"),
    ("length_penalty", float("nan"), "eval.length_penalty is nan; it must be a finite number"),
    ("batch_size", 0, "eval.batch_size is 0; it must be at least 1"),
    ("no_repeat_ngram_size", -1, "eval.no_repeat_ngram_size is -1; it must be at least 0"),
])
def test_a_checkpoint_whose_stored_settings_are_out_of_range_is_one_line_naming_file_and_key(
        tmp_path, checkpoint, capsys, key, value, message):
    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    doc = json.loads((checkpoint / "state.json").read_text())
    doc["state"]["config"]["eval"][key] = value
    (checkpoint / "state.json").write_text(json.dumps(doc))  # NaN as JSON's NaN, which Python reads back
    err = run_tool(caption_cli.main, ["--checkpoint", str(checkpoint), "--device", "cpu", str(tmp_path / "photo.png")],
                   capsys)
    assert err == f"capkit caption: error: {checkpoint / 'state.json'}: {message}; edit it back or use another model\n"


def test_visualize_refuses_a_file_that_is_no_image(tmp_path, checkpoint, capsys):
    (tmp_path / "notes.png").write_bytes(b"\x89PNG broken")
    err = run_tool(visualize_cli.main, [str(tmp_path / "notes.png"), "--checkpoint", str(checkpoint),
                                        "--out", str(tmp_path / "fig.png")], capsys)
    assert err.startswith("capkit visualize: error: cannot decode image") and not (tmp_path / "fig.png").exists()


def test_visualize_never_writes_over_its_inputs_and_writes_the_format_its_suffix_names(tmp_path, checkpoint, capsys):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), "red").save(photo)
    model_copy = tmp_path / "ck"
    shutil.copytree(checkpoint, model_copy)
    before = {p: p.read_bytes() for p in [photo, *model_copy.iterdir()]}
    for out, message in ((photo, "is an input of this command"),
                         (model_copy / "model.safetensors", "is inside the model folder"),
                         (tmp_path / "figure.xyz", "a figure is written as .png, .pdf, .svg, .jpg")):
        err = run_tool(visualize_cli.main, [str(photo), "--checkpoint", str(model_copy), "--out", str(out)], capsys)
        assert err.startswith(f"capkit visualize: error: --out {out}") and message in err, err
    assert {p: p.read_bytes() for p in before} == before
    assert visualize_cli.main([str(photo), "--checkpoint", str(model_copy), "--out", str(tmp_path / "f.pdf")]) == 0
    assert (tmp_path / "f.pdf").read_bytes().startswith(b"%PDF")
    capsys.readouterr()


def test_evaluate_names_a_predictions_file_that_is_no_json(tmp_path, capsys):
    (tmp_path / "pred.json").write_text("[{")
    (tmp_path / "refs.json").write_text(json.dumps({"1": ["a dog"]}))
    err = run_tool(evaluate_cli.main, ["--predictions", str(tmp_path / "pred.json"), "--references",
                                       str(tmp_path / "refs.json"), "--tokenizer", "none", "--metrics", "bleu"], capsys)
    assert err.startswith("capkit evaluate: error:") and "pred.json" in err


@pytest.mark.parametrize("name, text, message", [
    ("pred.json", '{"1": "a dog"}', 'pred.json: expected COCO results, a JSON list of {"image_id": ..., "caption": ...}'),
    ("pred.json", "[1, 2]", 'pred.json: row 1 needs "image_id" and "caption", got 1'),
    ("pred.json", '[{"image_id": "1"}]', 'pred.json: row 1 needs "image_id" and "caption"'),
    ("pred.json", '[{"image_id": "1", "caption": null}]', 'pred.json: row 1 needs a text "caption" and a text or '
                                                           'integer "image_id", got'),
    ("pred.json", '[{"image_id": [1], "caption": "a dog"}]', 'pred.json: row 1 needs a text "caption"'),
    ("pred.jsonl", '{"image_id": "1", "caption": 5}\n', 'pred.jsonl: row 1 needs a text "caption"'),
    ("pred.jsonl", '{"image_id": "1", "caption": "a dog"}\n{bad\n', "pred.jsonl:2: not a JSON object"),
    ("pred.csv", "image_id,caption\n1\n", 'pred.csv: row 1 needs a text "caption" and a text or integer "image_id", '
                                           "got {'image_id': '1', 'caption': None}"),
    ("pred.json", '[{"image_id": "1", "caption": "a dog"}, {"image_id": "1", "caption": "a cat"}]',
     "pred.json: image '1' has more than one caption; keep one per image"),
])
def test_a_malformed_predictions_file_is_one_line_naming_the_row(tmp_path, capsys, name, text, message):
    (tmp_path / name).write_text(text)
    (tmp_path / "refs.json").write_text(json.dumps({"1": ["a dog"]}))
    err = run_tool(evaluate_cli.main, ["--predictions", str(tmp_path / name), "--references",
                                       str(tmp_path / "refs.json"), "--tokenizer", "none", "--metrics", "bleu"], capsys)
    assert err.startswith(f"capkit evaluate: error: {tmp_path / name.split('.')[0]}") and message in err, err


def test_ablate_refuses_a_config_without_variants(tmp_path, capsys):
    (tmp_path / "ablation.yaml").write_text("base: tiny.yaml\nvariants: []\n")
    err = run_tool(ablate_cli.main, [str(tmp_path / "ablation.yaml")], capsys)
    assert err == f"capkit ablate: error: {tmp_path / 'ablation.yaml'}: no variants listed\n"


def test_an_empty_training_split_is_its_own_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_SHAPES_CONFIG)
    err = run_tool(train_cli.main, [str(config), "data.dataset.num_train=0"], capsys)
    assert err == "capkit train: error: shapes train split: no images to train on\n"


@pytest.mark.parametrize("text, message", [
    ("model: {encoder: [unclosed\n", r"tiny\.yaml:2:1: not valid YAML \(.*\); fix the file"),
    ("data:\n  dataset: {name: shapes}\n\tbad: tab\n", r"tiny\.yaml:3:1: not valid YAML"),
    ("- a list\n- not a mapping\n", r"tiny\.yaml: a config is a YAML mapping \(model:, data:, train:, eval:\), not a "
                                    r"ListConfig"),
    ("hello\n", r"tiny\.yaml: a config is a YAML mapping \(model:, data:, train:, eval:\), not the single value "
                r"'hello'"),
    ("3\n", r"tiny\.yaml: a config is a YAML mapping .*, not the single value '3'"),
    ("model: 3\n", r"tiny\.yaml: model is a section of settings \(encoder, attention, decoder\), not 3"),
])
def test_a_config_that_is_not_valid_yaml_names_the_file_line_and_column(tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(text)
    assert train_cli.main(["tiny.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capkit train: error: ") and err.count("\n") == 1 and re.search(message, err), err


def test_heads_that_do_not_divide_the_width_are_one_line_naming_the_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAPKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    sat = ("  attention: {name: bahdanau, attn_dim: 8}\n"
           "  decoder: {name: show_attend_tell, embed_dim: 8, hidden_dim: 16, feature_dim: 16}\n")
    assert sat in TINY_SHAPES_CONFIG
    (tmp_path / "tr.yaml").write_text(TINY_SHAPES_CONFIG.replace(
        sat, "  attention: {name: none}\n  decoder: {name: transformer, d_model: 10, num_heads: 3}\n"))
    assert train_cli.main(["tr.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("capkit train: error: decoder 'transformer' cannot be built with d_model=10, num_heads=3, "
                          "encoder_dim=") and "not divisible by num_heads 3; check these settings" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists()


def test_init_from_a_model_of_other_captions_is_refused_naming_the_share_of_unknown_words(tmp_path, monkeypatch,
                                                                                         capsys):
    from PIL import Image

    monkeypatch.setenv("CAPKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY_SHAPES_CONFIG)
    assert train_cli.main(["tiny.yaml", "train.run_name=shapes"]) == 0
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = [("a.png", "zebras graze beside giraffes", "train"), ("b.png", "elephants bathe in mud", "train"),
            ("c.png", "zebras near water", "val"), ("d.png", "giraffes eat leaves", "test")]
    for i, (name, _, _) in enumerate(rows):
        Image.new("RGB", (40, 40), (50 * i, 90, 160)).save(photos / name)
    (photos / "captions.csv").write_text("image,caption,split\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    shapes = "  dataset: {name: shapes, num_train: 12, num_val: 4, num_test: 4, image_size: 64}\n"
    (tmp_path / "zoo.yaml").write_text(TINY_SHAPES_CONFIG.replace(shapes, f"  dataset: {{name: folder, root: {photos}}}\n"))
    capsys.readouterr()
    assert train_cli.main(["zoo.yaml", "train.run_name=zoo", "train.init_from=runs/shapes/checkpoints/best"]) == 2
    err = capsys.readouterr().err
    # 7 of the 8 training words are unknown (only "in" is a shapes word)
    assert re.fullmatch(r"capkit train: error: train\.init_from=runs/shapes/checkpoints/best's vocabulary has \d+ "
                        r"words: 88% of the training captions' words would be <unk>; it was trained on other "
                        r"captions; start without train\.init_from\n", err), err
    assert not (tmp_path / "runs" / "zoo").exists()


def test_a_config_that_imports_plugin_modules_says_so(tmp_path, caplog):
    from capkit.config import load_config

    (tmp_path / "with_plugin.yaml").write_text("plugins: [capkit_adaptive]\n")
    with caplog.at_level(logging.INFO, logger="capkit.config"):
        load_config(tmp_path / "with_plugin.yaml")
    assert f"importing the plugin modules ['capkit_adaptive'] that {tmp_path / 'with_plugin.yaml'} names" in caplog.text


@pytest.mark.parametrize("tool, flag, kind", [
    ("evaluate", "--out", "folder"), ("evaluate", "--per-image", "under a file"),
    ("evaluate", "--gallery-dir", "a file"), ("visualize", "--out", "under a file"),
])
def test_an_output_path_that_cannot_be_written_is_refused_before_the_work(tmp_path, capsys, monkeypatch, tool, flag,
                                                                          kind):
    from capkit.recipes import inference

    loaded = []
    monkeypatch.setattr(inference.TrainedCaptioner, "from_checkpoint",
                        classmethod(lambda cls, *a, **k: loaded.append(a)))
    (tmp_path / "a_file").write_text("x")
    path = {"folder": tmp_path, "under a file": tmp_path / "a_file" / "out.json", "a file": tmp_path / "a_file"}[kind]
    image = tmp_path / "photo.png"
    image.write_bytes(b"unused")
    argv = {"evaluate": ["--checkpoint", str(tmp_path), "--metrics", "sacrebleu", "--tokenizer", "none"],
            "visualize": [str(image), "--checkpoint", str(tmp_path)]}[tool]
    if flag == "--gallery-dir":
        argv += ["--gallery", "2"]
    main = {"evaluate": evaluate_cli.main, "visualize": visualize_cli.main}[tool]
    assert main([*argv, flag, str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"capkit {tool}: error: {flag} {path}: ") and err.count("\n") == 1, err
    assert {"folder": "is a folder; give a file name", "under a file": "is a file, so nothing can be written below it",
            "a file": "is a file; give a folder"}[kind] in err
    assert loaded == []  # refused before the model was loaded


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin.yaml").write_bytes(b"train: {run_name: caf\xe9}\n")
    assert train_cli.main(["latin.yaml"]) == 2
    assert capsys.readouterr().err == "capkit train: error: latin.yaml: not UTF-8 text (byte 21); save it as UTF-8\n"


def test_a_run_that_diverges_is_one_line_naming_the_step_and_what_to_lower(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAPKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY_SHAPES_CONFIG)
    assert train_cli.main(["tiny.yaml", "train.lr=1e30", "train.grad_clip=null"]) == 2
    out = capsys.readouterr().err
    err = out.splitlines(keepends=True)[-1]  # after the progress bars
    assert "Traceback" not in out and re.fullmatch(r"capkit train: error: training diverged: non-finite loss nan at epoch 0, global step \d+ "
                        r"\(parts: .*\); lower train\.lr, set train\.grad_clip \(e\.g\. 5\.0\) or use train\.amp=none\n",
                        err), err


@pytest.mark.parametrize("tool", ["train", "caption", "evaluate", "demo"])
def test_an_unknown_device_is_one_line_listing_the_choices(tmp_path, monkeypatch, checkpoint, capsys, tool):
    from capkit.cli import demo as demo_cli

    monkeypatch.setenv("CAPKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY_SHAPES_CONFIG)
    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    model = ["--checkpoint", str(checkpoint), "--device", "tpu"]
    main, argv = {"train": (train_cli.main, ["tiny.yaml", "train.device=tpu"]),
                  "caption": (caption_cli.main, [*model, "photo.png"]),
                  "evaluate": (evaluate_cli.main, [*model, "--metrics", "sacrebleu", "--tokenizer", "none"]),
                  "demo": (demo_cli.main, [*model, "--port", "0"])}[tool]
    err = run_tool(main, argv, capsys)
    assert re.fullmatch(rf"capkit {tool}: error: device 'tpu' is no device; choose one of auto, cpu, cuda, "
                        r"cuda:N(, mps)?\n", err), err
    assert not (tmp_path / "runs").exists()
