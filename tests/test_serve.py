"""The HTTP endpoint of ``capkit demo``: captions as the model gives them, each bad upload a 4xx with a one-line
JSON error while the server goes on, concurrent requests batched into one beam search, limits and the command."""
from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from PIL import Image

from capkit.cli import demo as demo_cli
from capkit.data import load_split
from capkit.pretrained import TrainedCaptioner
from capkit.serve import ServeSettings
from capkit.serve.app import create_app
from capkit.serve.server import serving
from capkit.types import UNK_ID
from toys import tiny_trained

SHAPES_VAL = {"name": "shapes", "num_train": 12, "num_val": 4, "num_test": 4, "image_size": 64}


@pytest.fixture(scope="module")
def model(tiny_run) -> TrainedCaptioner:
    return TrainedCaptioner.from_checkpoint(tiny_run.best)


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    return [r.open() for r in load_split(SHAPES_VAL, "val").records]


def encoded(picture: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(model):
    with serving(create_app(model, ServeSettings(max_upload_bytes=200_000, model_name="tiny"))) as url:
        yield url


def test_the_endpoint_answers_what_the_model_captions_with_n_best_and_attention(model, pictures, server):
    picture = pictures[0]
    alone = model.caption(picture, n_best=2)
    reply = httpx.post(f"{server}/caption", params={"n_best": 2, "attention": "true"},
                       files={"image": ("shape.png", encoded(picture), "image/png")}, timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["caption"] == alone.caption and body["words"] == alone.words
    assert body["score"] == pytest.approx(alone.score, abs=1e-5)
    assert [h["caption"] for h in body["n_best"]] == [c for c, _ in alone.n_best]
    assert body["decoding"] == model.decoding and body["image_size"] == list(picture.size)
    maps = body["attention"]["maps"]  # (T + 1, H, W): a map per word and <end>'s, each summing to 1
    rows, cols = body["attention"]["grid"]
    assert (len(maps), len(maps[0]), len(maps[0][0])) == (len(alone.words) + 1, rows, cols)
    assert all(sum(map(sum, m)) == pytest.approx(1, abs=1e-3) for m in maps)
    assert body["attention"]["region"] == pytest.approx(list(alone.region), abs=0.01)
    raw = httpx.post(f"{server}/caption", content=encoded(picture, "JPEG"), timeout=60).json()  # the body is the file
    assert "attention" not in raw and raw["n_best"] == [{"caption": raw["caption"], "score": raw["score"]}]
    assert raw["caption"] == model.caption(Image.open(io.BytesIO(encoded(picture, "JPEG")))).caption


def _bomb() -> bytes:
    """A 1-bit PNG of 9,000 x 9,000 pixels in a few kilobytes: 243 MB once decoded to RGB."""
    return encoded(Image.new("1", (9000, 9000)))


BAD_UPLOADS = {
    "empty": (lambda jpeg: b"", 400, "the upload is empty (0 bytes): send an image file"),
    "not an image": (lambda jpeg: b"%PDF-1.7 not a picture" * 10, 415,
                     "the upload is not an image this server can read: send a JPEG, PNG"),
    "over the size limit": (lambda jpeg: jpeg + b"\0" * 200_000, 413, "over this server's limit of 200,000"),
    "decompression bomb": (lambda jpeg: _bomb(), 413,
                           "the upload has 9000 x 9000 pixels, over this server's limit of 40,000,000"),
    "truncated JPEG": (lambda jpeg: jpeg[: len(jpeg) // 2], 400, "the upload is damaged or cut short (image file is "
                                                                  "truncated"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_each_bad_upload_gets_its_4xx_with_a_one_line_message_and_the_next_request_succeeds(model, pictures, server,
                                                                                           case):
    make, status, message = BAD_UPLOADS[case]
    jpeg = encoded(pictures[1], "JPEG")
    for send in ({"content": make(jpeg)}, {"files": {"image": ("upload.bin", make(jpeg))}}):
        reply = httpx.post(f"{server}/caption", timeout=60, **send)
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert "\n" not in error
        assert message.replace("the upload", "upload.bin" if "files" in send else "the upload") in error \
            or (status == 413 and "over this server's limit" in error), error
    good = httpx.post(f"{server}/caption", content=jpeg, timeout=60)
    assert good.status_code == 200 and good.json()["caption"] == model.caption(Image.open(io.BytesIO(jpeg))).caption


@pytest.mark.parametrize("query, form, message", [
    ({"beam_size": 0}, None, "invalid request: beam_size: Input should be greater than or equal to 1"),
    ({"beam_size": 11}, None, "invalid request: beam_size: Input should be less than or equal to 10"),
    ({"length_penalty": "much"}, None, "invalid request: length_penalty: Input should be a valid number"),
    ({"beam_size": 2, "n_best": 3}, None, "n_best=3 is more than the beam size 2: a beam search keeps that many "
                                          "captions; raise beam_size"),
    ({}, {"picture": "x"}, "the form has no file field 'image'"),
    ({"no_repeat_ngram_size": -1}, None, "invalid request: no_repeat_ngram_size: Input should be greater than or "
                                         "equal to 0"),
    ({"suppress_unk": "maybe"}, None, "invalid request: suppress_unk: Input should be a valid boolean"),
    ({"beam": 5}, None, "unknown parameter 'beam'; the parameters are attention, beam_size, length_penalty, max_len, "
                        "n_best, no_repeat_ngram_size, suppress_unk"),
])
def test_bad_settings_and_forms_are_a_4xx_naming_the_setting(pictures, server, query, form, message):
    reply = httpx.post(f"{server}/caption", params=query, timeout=60,
                       **({"data": form, "files": {"other": ("a", b"b")}} if form else
                          {"content": encoded(pictures[0])}))
    assert 400 <= reply.status_code < 500 and reply.json()["error"].startswith(message), reply.text


def test_no_repeat_ngram_size_is_a_request_setting(model, pictures, server):
    reply = httpx.post(f"{server}/caption", params={"no_repeat_ngram_size": 1}, content=encoded(pictures[0]),
                       timeout=60).json()
    assert reply["decoding"] == {**model.decoding, "no_repeat_ngram_size": 1}
    assert reply["caption"] == model.caption(pictures[0], no_repeat_ngram_size=1).caption
    assert len(set(reply["words"])) == len(reply["words"])  # 1: no word twice


def test_suppress_unk_is_a_request_setting(pictures):
    unknowing = tiny_trained()
    with torch.no_grad():
        unknowing.model.decoder.out.bias[UNK_ID] += 3.0  # <unk> among the model's words
    with serving(create_app(unknowing)) as url:
        replies = {flag: httpx.post(f"{url}/caption", params={"suppress_unk": flag}, content=encoded(pictures[0]),
                                    timeout=60).json() for flag in ("false", "true")}
    assert replies["true"]["decoding"] == {**unknowing.decoding, "suppress_unk": True}
    assert "<unk>" in replies["false"]["words"] and "<unk>" not in replies["true"]["words"]
    assert replies["true"]["words"] == unknowing.caption(pictures[0], suppress_unk=True).words


def test_two_concurrent_requests_share_one_beam_search_with_the_captions_they_get_alone(model, pictures):
    # a batch closes when it holds max_batch pictures: the generous window only waits for the second request
    app = create_app(model, ServeSettings(max_batch=2, max_wait=10.0))
    alone = [model.caption(p, n_best=2) for p in pictures[:2]]
    with serving(app) as url:
        start = threading.Barrier(2)

        def post(picture: Image.Image) -> dict:
            start.wait()
            return httpx.post(f"{url}/caption", params={"n_best": 2}, content=encoded(picture), timeout=60).json()

        threads = [_Returning(post, p) for p in pictures[:2]]
        replies = [t.result() for t in threads]
        stats = httpx.get(f"{url}/health").json()["stats"]
    assert stats == {"requests": 2, "calls": 1, "largest_call": 2, "call_sizes": {"2": 1}}
    assert [r["caption"] for r in replies] == [a.caption for a in alone]
    assert [[h["caption"] for h in r["n_best"]] for r in replies] == [[c for c, _ in a.n_best] for a in alone]
    assert [r["score"] for r in replies] == pytest.approx([a.score for a in alone], abs=1e-5)


def test_requests_with_other_settings_are_decoded_apart_and_batching_off_makes_one_call_each(model, pictures):
    app = create_app(model, ServeSettings(max_batch=2, max_wait=10.0))
    with serving(app) as url:
        threads = [_Returning(lambda b: httpx.post(f"{url}/caption", params={"beam_size": b},
                                                   content=encoded(pictures[0]), timeout=60).json(), beam)
                   for beam in (1, 3)]
        replies = [t.result() for t in threads]
        assert httpx.get(f"{url}/health").json()["stats"]["call_sizes"] == {"1": 2}
    assert [r["decoding"]["beam_size"] for r in replies] == [1, 3]
    with serving(create_app(model, ServeSettings(max_batch=1))) as url:
        threads = [_Returning(lambda p: httpx.post(f"{url}/caption", content=encoded(p), timeout=60), p)
                   for p in pictures[:3]]
        assert all(t.result().status_code == 200 for t in threads)
        assert httpx.get(f"{url}/health").json()["stats"]["call_sizes"] == {"1": 3}


def test_a_request_past_its_timeout_gets_503_and_the_server_goes_on(model, pictures, monkeypatch):
    slow_once = iter([True])
    caption_pictures = model.caption_pictures

    def slow(*args, **kwargs):
        if next(slow_once, False):
            time.sleep(1.5)
        return caption_pictures(*args, **kwargs)

    monkeypatch.setattr(model, "caption_pictures", slow)
    with serving(create_app(model, ServeSettings(timeout=0.5))) as url:
        late = httpx.post(f"{url}/caption", content=encoded(pictures[0]), timeout=60)
        assert late.status_code == 503
        assert late.json()["error"] == "no caption within the server's limit of 0.5 s (it is busy); try again shortly"
        time.sleep(1.2)  # the slow call ends; its result is dropped
        assert httpx.post(f"{url}/caption", content=encoded(pictures[0]), timeout=60).status_code == 200


def test_the_page_and_health_are_served(model, server):
    page = httpx.get(server).text
    for element in ('id="file"', 'id="beam"', 'id="length-penalty"', 'id="overlay"', 'id="n-best"'):
        assert element in page
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["decoding"] == model.decoding


def test_the_command_refuses_a_taken_port_and_bad_limits_before_loading_a_model(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert demo_cli.main(["--model", "no/such-model", "--port", str(port)]) == 2
        assert capsys.readouterr().err.strip() == (f"capkit demo: error: --port {port}: already in use on 127.0.0.1; "
                                                   f"give another port (0 picks a free one)")
    assert demo_cli.main(["--port", "70000"]) == 2
    assert "--port 70000: give a port from 0 to 65535" in capsys.readouterr().err
    assert demo_cli.main(["--timeout", "0"]) == 2
    assert "--timeout 0: give a positive number" in capsys.readouterr().err
    assert demo_cli.main(["--host", ""]) == 2
    assert "--host is empty: give an address" in capsys.readouterr().err
    assert demo_cli.main(["--model", " "]) == 2
    assert "--model is empty: give a model folder" in capsys.readouterr().err


class _Returning(threading.Thread):
    """A thread that runs ``function(argument)`` at once; ``result()`` waits for its return value."""

    def __init__(self, function, argument):
        super().__init__(daemon=True)
        self._call, self._value = (lambda: function(argument)), None
        self.start()

    def run(self) -> None:
        self._value = self._call()

    def result(self):
        self.join(timeout=120)
        return self._value


def test_without_the_serve_extra_the_command_says_what_to_install():
    code = ("import sys\nsys.modules['fastapi'] = None\nfrom capkit.cli.main import main\n"
            "sys.exit(main(['demo', '--port', '0']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "capkit demo: error: capkit demo needs FastAPI, uvicorn and python-multipart (fastapi is missing): "
        "pip install 'capkit-captioning[serve]'")


def test_routes_methods_and_broken_forms_answer_in_the_same_json_shape(server):
    for method, path, status in (("GET", "/nowhere", 404), ("GET", "/caption", 405), ("PUT", "/health", 405)):
        reply = httpx.request(method, f"{server}{path}")
        assert reply.status_code == status and reply.json()["error"].endswith(f": {method} {path}"), reply.text
    broken = httpx.post(f"{server}/caption", content=b"--x\r\nnot a part",
                        headers={"content-type": "multipart/form-data; boundary=x"})
    assert broken.status_code == 400 and broken.json()["error"].startswith("the multipart form cannot be read")
    two = httpx.post(f"{server}/caption", files=[("image", ("a.png", b"1")), ("image", ("b.png", b"2"))])
    assert two.status_code == 400 and "the multipart form cannot be read" in two.json()["error"]
