"""The prompt page end to end in headless Chromium (Debian's package) driven by Playwright:
type a prompt, see it flagged, drop the suggested word, see it become safe.

The threshold is set between the prompt's score and its score without the word the page
suggests first, so these check the page's mechanics; detector quality is tested elsewhere.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from scanner.detect import DetectSettings, Scanner
from scanner.explain import drop_word, explain, split_words
from scanner.model import load_model
from scanner.service import create_app

pytestmark = pytest.mark.browser
CHROMIUM = os.environ.get("MEMSCAN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
WAIT_MS = 60_000  # a ceiling for slow shared CI machines, not a latency requirement


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set MEMSCAN_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@contextmanager
def serving(app):
    """Run the app with uvicorn on a free 127.0.0.1 port in a background thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_MS / 1000
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _page_case(scanner: Scanner, prompt: str) -> dict:
    """The threshold, the words the page should show and the texts after each drop."""
    tokenizer = scanner.family.tokenizer
    (explanation,) = explain(scanner, [prompt], "ablation")
    top = max(range(len(explanation.words)), key=lambda i: explanation.words[i].score)
    assert explanation.words[top].score > 0, f"no word of {prompt!r} lowers its score when dropped"
    dropped = drop_word(prompt, split_words(tokenizer, prompt)[top])
    return {
        # Between the prompt's score and its score without the first suggestion.
        "threshold": (explanation.score + explanation.words[top].score_without) / 2,
        "words": [w.word for w in explanation.words],
        "dropped": dropped,
        "dropped_again": drop_word(dropped, split_words(tokenizer, dropped)[0]),
    }


def _type_flag_drop(browser, url: str, prompt: str, case: dict) -> None:
    """Type the prompt, see it flagged, take the first suggestion, see it safe, click a word."""
    from playwright.sync_api import expect

    page = browser.new_page()
    try:
        page.goto(url)
        verdict = page.locator("#verdict")
        expect(verdict).to_have_attribute("data-state", "idle")
        page.locator("#prompt").press_sequentially(prompt)
        expect(verdict).to_have_attribute("data-state", "flagged", timeout=WAIT_MS)
        expect(page.locator("#words .word")).to_have_text(case["words"], timeout=WAIT_MS)
        page.locator("#suggestions button").first.click()
        expect(verdict).to_have_attribute("data-state", "safe", timeout=WAIT_MS)
        expect(page.locator("#prompt")).to_have_value(case["dropped"])
        page.locator("#words .word").first.click()  # clicking a highlighted word drops it too
        expect(page.locator("#prompt")).to_have_value(case["dropped_again"], timeout=WAIT_MS)
    finally:
        page.close()


def test_page_on_the_tiny_model(browser, tiny_sd1):
    scanner = Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings(seed=random.randrange(2**31)))
    prompt = "a cat, sitting on a red sofa"
    case = _page_case(scanner, prompt)
    with serving(create_app(scanner, threshold=case["threshold"])) as url:
        _type_flag_drop(browser, url, prompt, case)


def test_page_asks_for_the_token_once(browser, tiny_sd1):
    from playwright.sync_api import expect

    scanner = Scanner(load_model(tiny_sd1, device="cpu"), DetectSettings())
    with serving(create_app(scanner, threshold=1e6 + 0.123456, token="s3cret")) as url:
        page = browser.new_page()
        try:
            page.goto(url)
            page.locator("#prompt").press_sequentially("a cat")
            expect(page.locator("#auth")).to_be_visible(timeout=WAIT_MS)
            page.locator("#token").fill("s3cret")
            page.locator("#auth button").click()
            expect(page.locator("#verdict")).to_have_attribute("data-state", "safe", timeout=WAIT_MS)
            expect(page.locator("#threshold")).to_have_text("(threshold 1000000)")
            page.locator("#prompt").press_sequentially(" on a sofa")  # the token is kept: no second ask
            expect(page.locator("#words .word")).to_have_count(5, timeout=WAIT_MS)
            expect(page.locator("#auth")).to_be_hidden()
        finally:
            page.close()


def test_page_on_the_testbed(browser, planted_testbed):
    model_dir, rows = planted_testbed
    scanner = Scanner(load_model(model_dir, device="cpu"), DetectSettings())
    prompt = next(row["prompt"] for row in rows if row["label"] == 1)  # a planted prompt
    case = _page_case(scanner, prompt)
    with serving(create_app(scanner, threshold=case["threshold"])) as url:
        _type_flag_drop(browser, url, prompt, case)
