"""The playground page of ``lmadapt serve`` (``GET /``): served by the app, then used in a real headless Chromium.

The server runs on loopback (as in ``test_serving_http.py``) over a tiny Llama with two tiny LoRA adapters and an
API key. The browser tests (marker ``browser``: ``make test-browser`` installs Debian's ``chromium`` when it is
missing and runs them; ``pytest -m browser`` where Chromium is) drive ``chromium --headless`` over the DevTools
protocol (:mod:`headless_chromium`) and use the page as a person would: mouse clicks and typed text through the
browser's input pipeline. The reference for every answer is :func:`lmadapt.decoding.generation.generate` on the
base, or the base with that adapter, loaded on its own.

``python tests/test_serving_playground.py URL OUT.png MODEL... --prompt TEXT`` takes the screenshot of a
running server's page that ``docs/img/playground.png`` is.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx2
import pytest
from headless_chromium import Chromium, find_chromium
from test_serving_http import running

from lmadapt.api import load
from lmadapt.decoding.generation import generate
from lmadapt.serving.app import Limits, create_app
from lmadapt.serving.server import load_engine
from lmadapt.testing import tiny_lora_adapters

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "sk-playground-key"
SERVING = Path(__file__).resolve().parents[1] / "src" / "lmadapt" / "serving"


def chromium_binary() -> str:
    found = find_chromium()
    if not found:
        pytest.fail("the browser tests need Chromium: install it (Debian: `apt-get install chromium`; `make "
                    "test-browser` does that as root), or set LMADAPT_CHROMIUM to a Chromium or Chrome binary",
                    pytrace=False)
    return found


# --- the page's actions, as a person does them --------------------------------------------------------------

COLUMNS = "[...document.querySelectorAll('#outputs .column')]"
RESULTS = f"""{COLUMNS}.map(c => ({{model: c.dataset.model, state: c.dataset.state,
    text: c.querySelector('.text').textContent, elements: c.querySelector('.text').childElementCount,
    meta: c.querySelector('.meta').textContent.replace(/\\s+/g, ' ').trim(),
    error: c.querySelector('.error').hidden ? null : c.querySelector('.error').textContent}}))"""
FINISHED = f"{COLUMNS}.length > 0 && {COLUMNS}.every(c => !['waiting', 'streaming'].includes(c.dataset.state))"
WATCH = """window.updates = {};
new MutationObserver(() => {  // runs after each batch of changes: one entry per text the column showed
  for (const c of document.querySelectorAll('#outputs .column')) {
    const text = c.querySelector('.text').textContent, seen = (window.updates[c.dataset.model] ||= []);
    if (text && seen[seen.length - 1] !== text) seen.push(text);
  }
}).observe(document.getElementById('outputs'), {childList: true, subtree: true, characterData: true});"""


def connect(browser: Chromium, url: str, key: str = KEY) -> None:
    """Open the page and give it the key it asks for; it then lists the models."""
    browser.open(url)
    browser.wait_for("!document.getElementById('key-form').hidden")
    browser.type("#api-key", key)
    browser.click("#connect")
    browser.wait_for("document.querySelectorAll('#model-list input').length")


def choose(browser: Chromium, models: list[str]) -> None:
    for name, checked in browser.evaluate("[...document.querySelectorAll('#model-list input')]"
                                          ".map(b => [b.value, b.checked])"):
        if checked != (name in models):
            browser.click(f'#model-list input[value="{name}"]')
    assert browser.evaluate("[...document.querySelectorAll('#model-list input:checked')].map(b => b.value)") == [
        m for m in browser.evaluate("[...document.querySelectorAll('#model-list input')].map(b => b.value)")
        if m in models]


def ask(browser: Chromium, prompt: str, *, max_tokens: int, temperature: str = "0", system: str = "") -> None:
    browser.type("#max-tokens", str(max_tokens))
    browser.type("#temperature", temperature)
    if system:
        browser.type("#system", system)
    browser.type("#prompt", prompt)
    browser.click("#send")


# --- fixtures -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A server for base "tiny" and adapters "a" and "b", with an API key."""
    adapters = dict(zip(["a", "b"], tiny_lora_adapters(root=tmp_path_factory.mktemp("playground-adapters"))))
    loaded = load_engine(str(tiny_model_dir), adapters, served_model_name="tiny", max_batch_size=4, max_queue=16)
    app = create_app(loaded.engine, loaded.tokenizer, loaded.base, api_key=KEY, limits=Limits(max_tokens=512))
    with running(app) as (url, _):
        yield {"url": url, "engine": loaded.engine, "adapters": adapters, "model_dir": str(tiny_model_dir)}


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Chromium]:
    chromium = Chromium(chromium_binary(), tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield chromium
    finally:
        chromium.close()


def greedy(served: dict[str, Any], model: str, prompt: str, n: int) -> str:
    adapter = served["adapters"].get(model)
    reference, tokenizer = load(served["model_dir"], adapter=adapter)[:2]
    return generate(reference, tokenizer, [prompt], chat=True, max_new_tokens=n)[0]


# --- served as files (no browser) ---------------------------------------------------------------------------

class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [value or "" for name, value in attrs if name in ("src", "href")]


def test_the_page_is_served_without_the_key_and_loads_nothing_from_elsewhere(served):
    files = {path: httpx2.get(served["url"] + path) for path in ("/", "/playground.js", "/playground.css")}
    for path, media in zip(files, ("text/html", "text/javascript", "text/css")):
        response = files[path]
        assert response.status_code == 200 and response.headers["content-type"] == f"{media}; charset=utf-8"
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
        assert re.search(r"https?:|//[a-z]|@import|url\(", re.sub(r"(?m)^\s*//.*$|/\*.*?\*/", "", response.text,
                                                                    flags=re.DOTALL)) is None, path
    assert httpx2.get(served["url"] + "/v1/models").status_code == 401  # the page opens nothing else
    parser = Links()
    parser.feed(files["/"].text)
    assert sorted(parser.links) == ["data:,", "playground.css", "playground.js"]
    script = files["/playground.js"].text
    assert sorted(set(re.findall(r'fetch\("([^"]+)"', script))) == ["v1/chat/completions", "v1/models"]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function(",
                 "localStorage", "sessionStorage", "cookie"):
        assert sink not in script, f"playground.js uses {sink}"
    assert KEY not in files["/"].text + script


def test_every_file_of_the_page_ships_with_the_package():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")
    declared = tomllib.loads((SERVING.parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["lmadapt.serving"]
    on_disk = sorted(p.name for p in SERVING.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc"))
    assert on_disk == sorted(declared) == ["playground.css", "playground.html", "playground.js"]


# --- in the browser -----------------------------------------------------------------------------------------

@pytest.mark.browser
def test_the_page_streams_each_models_own_greedy_answer_side_by_side(served, browser):
    browser.open(served["url"])
    assert browser.wait_for("!document.getElementById('key-form').hidden && "
                            "document.getElementById('status').textContent") == "This server needs an API key."
    assert browser.evaluate("document.activeElement.id") == "api-key"
    browser.type("#api-key", "sk-wrong")
    browser.click("#connect")
    assert browser.wait_for("document.getElementById('status').textContent.includes('refused') && "
                            "document.getElementById('status').textContent")
    assert browser.evaluate("document.querySelectorAll('#model-list input').length") == 0
    browser.type("#api-key", KEY)
    browser.click("#connect")
    browser.wait_for("document.querySelectorAll('#model-list input').length")
    labels = browser.evaluate("[...document.querySelectorAll('#model-list label')].map(l => l.textContent)")
    assert labels == ["tinybase", "aon tiny", "bon tiny"]  # the name, then its kind
    assert browser.evaluate("document.getElementById('status').textContent") == (
        "1 base model, 2 adapters. Pick one or more, then send a prompt.")
    assert browser.evaluate("document.getElementById('key-form').hidden")
    assert browser.evaluate("[...document.querySelectorAll('#model-list input:checked')].map(b => b.value)") == [
        "tiny"]  # the base is chosen to begin with

    choose(browser, ["tiny", "a", "b"])
    browser.evaluate(WATCH)
    ask(browser, "hello", max_tokens=24)
    assert browser.evaluate("document.getElementById('stop').disabled") is False  # a run is in flight
    browser.wait_for(FINISHED)
    results = browser.evaluate(RESULTS)
    updates = browser.evaluate("window.updates")
    assert [r["model"] for r in results] == ["tiny", "a", "b"]
    answers = {model: greedy(served, model, "hello", 24) for model in ("tiny", "a", "b")}
    assert len(set(answers.values())) == 3  # three different models, three different answers
    for result in results:
        model = result["model"]
        assert (result["state"], result["error"], result["elements"]) == ("done", None, 0), result
        assert result["text"] == answers[model]
        assert re.fullmatch(r"24 tokens first token \d+\.\d\d s \d+\.\d\d s finish: length", result["meta"])
        seen = updates[model]
        assert len(seen) >= 2 and seen[-1] == answers[model], seen  # it grew in front of the reader
        assert all(later.startswith(earlier) and later != earlier for earlier, later in itertools.pairwise(seen))
    assert browser.evaluate("[document.getElementById('send').disabled, document.getElementById('stop').disabled]"
                            ) == [False, True]
    assert browser.evaluate("document.getElementById('status').textContent") == "Done."
    assert browser.errors() == []
    if os.environ.get("LMADAPT_PLAYGROUND_SCREENSHOT"):
        browser.screenshot(os.environ["LMADAPT_PLAYGROUND_SCREENSHOT"])


@pytest.mark.browser
def test_stop_aborts_the_streams_and_the_server_stops_decoding(served, browser):
    connect(browser, served["url"])
    choose(browser, ["tiny", "a"])
    engine = served["engine"]
    ask(browser, "Tell me a long story.", max_tokens=400)
    browser.wait_for(f"{COLUMNS}.every(c => c.querySelector('.text').textContent.length > 0) || {FINISHED}")
    browser.click("#stop")
    browser.wait_for(FINISHED, timeout=10)
    results = browser.evaluate(RESULTS)
    assert [r["state"] for r in results] == ["stopped", "stopped"], results
    assert all(r["meta"].endswith(" stopped") for r in results)
    assert browser.evaluate("document.getElementById('status').textContent") == "Stopped."
    deadline = time.monotonic() + 10
    while engine.stats()["running"] or engine.stats()["waiting"]:  # the server cancelled both requests
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.02)
    full = greedy(served, "tiny", "Tell me a long story.", 400)
    stopped = next(r["text"] for r in results if r["model"] == "tiny")
    assert full.startswith(stopped) and len(stopped) < len(full)
    assert all(int(r["meta"].split()[0]) < 400 for r in results)
    assert browser.errors() == []


def sse(*events: Any) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


@pytest.mark.browser
def test_the_page_sends_what_was_asked_and_shows_model_text_and_errors_as_text(served, browser):
    """The server's answers are replaced in the browser (the DevTools Fetch domain) by ones no tiny model would
    write: a proxy-tuned model in the list, markup in the text, an error before the stream, one in the middle."""
    connect(browser, served["url"])
    browser.page("Fetch.enable", patterns=[{"urlPattern": "*/v1/models"}, {"urlPattern": "*/v1/chat/completions"}])
    try:
        browser.click("#refresh")
        paused = browser.next_event("Fetch.requestPaused")
        assert paused["request"]["headers"]["Authorization"] == f"Bearer {KEY}"
        cards = httpx2.get(paused["request"]["url"], headers={"Authorization": f"Bearer {KEY}"}).json()
        cards["data"].append({"id": "p", "object": "model", "parent": "tiny", "root": "/e", "max_model_len": 512,
                              "proxy": {"expert": "/e", "anti_expert": "/s", "beta": 1.5}})
        browser.page("Fetch.fulfillRequest", requestId=paused["requestId"], responseCode=200,
                     responseHeaders=[{"name": "Content-Type", "value": "application/json"}],
                     body=base64.b64encode(json.dumps(cards).encode()).decode())
        browser.wait_for("document.querySelectorAll('#model-list input').length === 4")
    finally:
        browser.page("Fetch.disable")
    folders = {"tiny": served["model_dir"], **served["adapters"]}
    assert browser.evaluate("[...document.querySelectorAll('#model-list label')].map(l => [l.textContent, l.title])"
                            ) == [["tinybase", f"from {folders['tiny']}"], ["aon tiny", f"from {folders['a']}"],
                                  ["bon tiny", f"from {folders['b']}"],
                                  ["pproxy-tuned on tiny", "expert /e, anti-expert /s, beta 1.5"]]
    assert browser.evaluate("document.getElementById('status').textContent").startswith(
        "1 base model, 2 adapters, 1 proxy-tuned model.")
    choose(browser, ["tiny", "a", "b"])
    browser.page("Fetch.enable", patterns=[{"urlPattern": "*/v1/chat/completions"}])
    markup = '<img src=x onerror="window.pwned=1"> & <script>window.pwned=2</script>\n'
    chunk = {"object": "chat.completion.chunk", "usage": None}
    answers = {
        "tiny": (200, "text/event-stream", sse(
            {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
            {**chunk, "choices": [{"index": 0, "delta": {"content": markup[:30]}}]},
            {**chunk, "choices": [{"index": 0, "delta": {"content": markup[30:]}}]},
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**chunk, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}},
            "[DONE]")),
        "a": (400, "application/json", json.dumps({"error": {
            "message": "max_tokens: 9 is <b>too</b> many", "type": "invalid_request_error", "param": "max_tokens",
            "code": "invalid_value"}})),
        "b": (200, "text/event-stream", sse({**chunk, "choices": [{"index": 0, "delta": {"content": "half"}}]},
                                            {"error": {"message": "generation failed: out of memory"}}, "[DONE]")),
    }
    try:
        ask(browser, "<b>hi</b>", max_tokens=9, temperature="0.7", system="Be brief.")
        for _ in answers:
            paused = browser.next_event("Fetch.requestPaused")
            request = paused["request"]
            body = json.loads(request["postData"])
            assert request["headers"]["Authorization"] == f"Bearer {KEY}"
            assert request["headers"]["Content-Type"] == "application/json" and request["method"] == "POST"
            assert body == {"model": body["model"], "stream": True, "stream_options": {"include_usage": True},
                            "temperature": 0.7, "max_tokens": 9,
                            "messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "<b>hi</b>"}]}
            status, media, text = answers[body["model"]]
            browser.page("Fetch.fulfillRequest", requestId=paused["requestId"], responseCode=status,
                         responseHeaders=[{"name": "Content-Type", "value": media}],
                         body=base64.b64encode(text.encode()).decode())
        browser.wait_for(FINISHED)
    finally:
        browser.page("Fetch.disable")
    tiny, a, b = browser.evaluate(RESULTS)
    assert (tiny["state"], tiny["text"], tiny["elements"], tiny["error"]) == ("done", markup, 0, None)
    assert tiny["meta"].startswith("7 tokens") and tiny["meta"].endswith("finish: stop")
    assert browser.evaluate("document.querySelectorAll('#outputs img, #outputs script, #outputs b').length") == 0
    assert browser.evaluate("window.pwned === undefined")
    assert (a["state"], a["text"], a["error"]) == ("error", "", "max_tokens: 9 is <b>too</b> many")
    assert (b["state"], b["text"], b["error"]) == ("error", "half", "generation failed: out of memory")
    assert browser.evaluate("document.getElementById('status').textContent") == "2 of 3 failed."
    assert browser.errors() == []


# --- the screenshot in docs/serving.md ----------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description="A screenshot of a running server's playground after one prompt.")
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--system", default="")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--width", type=int, default=1200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as profile:
        browser = Chromium(chromium_binary(), Path(profile), width=args.width, height=700)
        try:
            browser.open(args.url)
            browser.wait_for("document.querySelectorAll('#model-list input').length", timeout=120)
            choose(browser, args.models)
            ask(browser, args.prompt, max_tokens=args.max_tokens, system=args.system)
            browser.wait_for(FINISHED, timeout=600)
            browser.evaluate("document.activeElement.blur()")
            browser.screenshot(args.out)
        finally:
            browser.close()


if __name__ == "__main__":
    main()
