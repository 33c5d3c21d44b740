#!/usr/bin/env python
"""The README's screenshot of the demo page: ``capkit demo``'s app on a free local port, Debian's headless
Chromium uploads a photo and clicks one of its caption's words, and the page is saved as a PNG.

    python tools/screenshot_demo.py PHOTO [--model sat-flickr8k] [--word 2] [--out docs/figures/demo.png]

Needs the browser and its driver (``apt-get install chromium chromium-driver``) and selenium (the dev extra).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import capkit
from capkit.serve import ServeSettings
from capkit.serve.app import create_app
from capkit.serve.server import serving


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("photo", type=Path)
    parser.add_argument("--model", default="sat-flickr8k")
    parser.add_argument("--word", type=int, default=2, help="the index of the word whose attention is shown")
    parser.add_argument("--out", type=Path, default=Path("docs/figures/demo.png"))
    args = parser.parse_args()
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        sys.exit("no Chromium: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,760"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
    try:
        app = create_app(capkit.from_pretrained(args.model), ServeSettings(model_name=args.model))
        with serving(app) as url:
            chrome.get(url)
            chrome.find_element(By.ID, "file").send_keys(str(args.photo.resolve()))
            wait = WebDriverWait(chrome, 120)
            wait.until(lambda c: c.find_elements(By.CSS_SELECTOR, "#caption .word"))
            word = chrome.find_elements(By.CSS_SELECTOR, "#caption .word")[args.word]
            word.click()
            wait.until(lambda c: c.find_element(By.ID, "overlay").get_attribute("data-word") == word.text)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            chrome.save_screenshot(str(args.out))
            print(f"{args.out}: {' '.join(w.text for w in chrome.find_elements(By.CSS_SELECTOR, '#caption .word'))}"
                  f" (attention of {word.text!r})")
    finally:
        chrome.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
