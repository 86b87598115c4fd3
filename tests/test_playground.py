"""The playground at ``/``, in a real browser (Debian's Chromium, driven by Playwright) against a real server process
with two models: it loads under its Content-Security-Policy with no error, streams an answer with the server's figures
under it, stops a long answer (the server's running gauge returns to 0), switches model, shows a user's markup as
text, and asks for the key when the server has keys. ``--no-ui`` serves no page.

With ``PLAYGROUND_SCREENSHOT=path`` the test that chats leaves a screenshot there (the README's).
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from tests.harness.bodies import LONG_PROMPT
from tests.harness.process import ServerProcess
from tests.harness.responses import metric_sample
from tests.harness.waiting import eventually

# The distribution's browser (scripts/ensure_chromium.sh installs it): Debian's name, then Ubuntu's.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
KEY = "playground-key"
MODELS = "[[models]]\nid = 'alpha'\nbackend = 'onnx'\n\n[[models]]\nid = 'beta'\nbackend = 'onnx'\n"
WAIT_MS = 60_000  # generous: only a hang fails
# Polled in the page: once the answer being streamed shows text, press Stop (true: pressed).
FIRST_TEXT_THEN_STOP = """() => {
  const answers = document.querySelectorAll("#turns li.assistant .text");
  const last = answers[answers.length - 1];
  if (!last || !last.textContent) return false;
  document.getElementById("stop").click();
  return true;
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("playground")
    (folder / "models.toml").write_text(MODELS)
    with ServerProcess(folder / "server.log", MODELS_FILE=str(folder / "models.toml")) as running:
        yield running.wait_healthy()


@pytest.fixture
def page(browser: Browser, server: ServerProcess) -> Iterator[Page]:
    """The playground, loaded, with every console error it logs (a CSP violation is one) collected."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("console", lambda message: _keep_error(message, errors))
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(server.url + "/")
    expect(opened.locator("#model option")).to_have_count(2, timeout=WAIT_MS)
    yield opened
    context.close()
    assert errors == []


def _keep_error(message: ConsoleMessage, errors: list[str]) -> None:
    if message.type == "error":
        errors.append(message.text)


def _send(page: Page, text: str, **settings: str) -> Any:
    for field, value in settings.items():
        page.fill(f"#{field}", value)
    page.fill("#prompt", text)
    page.click("#send")
    return page.locator("#turns li.assistant").last


def test_the_page_is_served_from_the_package_under_a_strict_policy(server: ServerProcess) -> None:
    with urllib.request.urlopen(server.url + "/") as resp:
        policy = resp.headers["Content-Security-Policy"]
        html = resp.read().decode()
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe-inline" not in policy
    assert "<script src=" in html and "<script>" not in html  # no inline script the policy would have to allow
    assert "http" not in html.replace(server.url, "")  # nothing fetched from anywhere else


def test_an_answer_streams_with_the_servers_figures_under_it(page: Page, server: ServerProcess) -> None:
    answer = _send(page, "Hello there", max_tokens="24", temperature="0", system="Be brief")
    expect(answer.locator(".figures")).to_contain_text("TTFT", timeout=WAIT_MS)
    figures = answer.locator(".figures").inner_text()
    assert "generated" in figures and "finish" in figures and "tok/s" in figures
    assert answer.locator(".text").inner_text()
    second = _send(page, "And again")  # the chart now has two turns
    expect(second.locator(".figures")).to_contain_text("TTFT", timeout=WAIT_MS)
    if os.environ.get("PLAYGROUND_SCREENSHOT"):
        page.screenshot(path=os.environ["PLAYGROUND_SCREENSHOT"], full_page=True)


def test_stop_cancels_the_generation_on_the_server(page: Page, server: ServerProcess) -> None:
    answer = _send(page, LONG_PROMPT, max_tokens="1900", temperature="0")
    # Clicked inside the page the moment the first text shows: the bundled model writes 1900 tokens in well under a
    # second, and a click from outside waits for the growing page to hold still.
    page.wait_for_function(FIRST_TEXT_THEN_STOP, timeout=WAIT_MS)
    expect(page.locator("#status")).to_contain_text("stopped", timeout=WAIT_MS)
    eventually(lambda: _running(server) == 0, what="the server's running gauge back at 0")
    assert answer.locator(".figures").count() == 0  # it never finished


def test_switching_model_sends_to_that_model(page: Page, server: ServerProcess) -> None:
    before = _requests(server, "beta")
    page.select_option("#model", "beta")
    expect(_send(page, "Hi", max_tokens="4").locator(".figures")).to_contain_text("TTFT", timeout=WAIT_MS)
    assert _requests(server, "beta") == before + 1


def test_a_users_markup_is_shown_as_text(page: Page) -> None:
    markup = '<img src="x" onerror="document.title=1"><b>bold</b>'
    answer = _send(page, markup, max_tokens="2")
    expect(answer.locator(".figures")).to_contain_text("TTFT", timeout=WAIT_MS)
    assert page.locator("#turns li.user .text").last.inner_text() == markup
    assert page.locator("#turns img, #turns b").count() == 0


def test_with_keys_the_page_asks_for_one(browser: Browser, tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "server.log", API_KEYS=KEY) as keyed:
        keyed.wait_healthy()
        context = browser.new_context()
        page = context.new_page()
        page.goto(keyed.url + "/")
        expect(page.locator("#status")).to_contain_text("401", timeout=WAIT_MS)
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        expect(page.locator("#model option")).to_have_count(1, timeout=WAIT_MS)
        context.close()


def test_no_ui_serves_no_page(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "server.log", "--no-ui") as bare:
        bare.wait_healthy()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(bare.url + "/")
        missing.value.close()  # the error holds the response's socket
        assert missing.value.code == 404


def _metrics(server: ServerProcess) -> str:
    with urllib.request.urlopen(server.url + "/metrics") as resp:
        return str(resp.read().decode())


def _running(server: ServerProcess) -> float:
    line = next(line for line in _metrics(server).splitlines() if line.startswith("genai_server_num_requests_running"))
    return float(line.rsplit(" ", 1)[1])


def _requests(server: ServerProcess, model: str) -> float:
    try:
        return metric_sample(_metrics(server), "genai_server_requests_total", model=model, status="200")
    except AssertionError:  # no sample yet
        return 0.0
