"""The demo page in a real browser: Debian's headless Chromium (driven by Selenium through chromium-driver, the
driver built for that browser) uploads a photo, waits for the caption, clicks a word and finds its attention
overlay drawn; the page is saved as a screenshot. ``.ci/run`` installs the browser; elsewhere the test skips,
saying how to install it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from capkit.data import load_split
from capkit.pretrained import TrainedCaptioner
from capkit.serve import ServeSettings
from capkit.serve.app import create_app
from capkit.serve.server import serving

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra: pip install -e '.[dev]'")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    BROWSER is None or DRIVER is None,
    reason="no Chromium here: apt-get install chromium chromium-driver (.ci/run installs them)",
)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def test_upload_a_photo_read_its_caption_and_see_a_words_attention(tiny_run, browser, tmp_path):
    model = TrainedCaptioner.from_checkpoint(tiny_run.best)
    record = load_split({"name": "shapes", "num_train": 12, "num_val": 4, "num_test": 4, "image_size": 64},
                        "val").records[0]
    photo = tmp_path / "shape.png"
    record.open().resize((320, 240)).save(photo)
    expected = model.caption(photo, n_best=2)

    with serving(create_app(model, ServeSettings(model_name="tiny"))) as url:
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        # chosen at once, before the page may know the model's settings: it must caption with them all the same
        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#caption .word")) == len(expected.words))
        words = browser.find_elements(By.CSS_SELECTOR, "#caption .word")
        assert [w.text for w in words] == expected.words
        assert "tiny" in browser.find_element(By.ID, "model").text
        assert browser.find_element(By.ID, "beam").get_attribute("value") == str(model.decoding["beam_size"])
        n_best = browser.find_elements(By.CSS_SELECTOR, "#n-best li")
        assert [li.find_element(By.CLASS_NAME, "text").text for li in n_best] == [c for c, _ in expected.n_best]
        assert [float(li.find_element(By.CLASS_NAME, "score").text) for li in n_best] == \
            pytest.approx([s for _, s in expected.n_best], abs=1e-3)
        overlay = browser.find_element(By.ID, "overlay")
        assert overlay.get_attribute("data-word") is None  # nothing drawn before a word is chosen

        words[1].click()
        wait.until(lambda b: overlay.get_attribute("data-word") == expected.words[1])
        assert "active" in words[1].get_attribute("class")
        # the overlay holds the map: the photo dimmed outside the region the encoder saw (alpha 0.35 * 255), and
        # the map's peak drawn at the colour ramp's full alpha (40 + 170)
        alphas = browser.execute_script(
            "const c = document.getElementById('overlay');"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "const a = new Set(); for (let i = 3; i < d.length; i += 4) a.add(d[i]); return [...a];"
        )
        assert {89, 210} <= set(alphas)
        screenshot = tmp_path / "demo.png"
        assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
        browser.find_element(By.CSS_SELECTOR, "body").click()  # leaving the page as found

        # the whole-captions box starts at the model's setting and captions the photo again with it
        box = browser.find_element(By.ID, "suppress-unk")
        assert box.is_selected() is model.decoding["suppress_unk"] is False
        box.click()
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "never <unk>"))
        whole = model.caption(photo, suppress_unk=True)
        assert [w.text for w in browser.find_elements(By.CSS_SELECTOR, "#caption .word")] == whole.words

        # a file that is no image: the page shows the server's message
        bad = tmp_path / "notes.png"
        bad.write_bytes(b"not a picture at all")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        wait.until(expected_conditions.text_to_be_present_in_element(
            (By.ID, "status"), "notes.png is not an image this server can read"))
        assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
