"""Headless Chromium driven over the DevTools protocol on a pipe, for the tests of web pages (the playground).

``chromium --remote-debugging-pipe`` reads commands on its fd 3 and writes answers and events on its fd 4, each
a JSON message ended by a NUL byte: no driver binary (chromedriver) and no Python package beyond the standard
library. The browser is Debian's ``chromium`` (``apt-get install chromium``), or whatever ``LMADAPT_CHROMIUM``
names.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """``$LMADAPT_CHROMIUM``, else the first of :data:`NAMES` on the PATH, else None."""
    return os.environ.get("LMADAPT_CHROMIUM") or next(filter(None, map(shutil.which, NAMES)), None)


class Chromium:
    """One headless Chromium with one page (attached flat: page commands carry its ``sessionId``); every event
    is kept in :attr:`events` until :meth:`open` clears them."""

    def __init__(self, binary: str, profile: Path, width: int = 1280, height: int = 860) -> None:
        to_chromium, commands = os.pipe()
        answers, from_chromium = os.pipe()
        to_chromium, from_chromium = _above_4(to_chromium), _above_4(from_chromium)
        flags = ["--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--mute-audio",
                 "--disable-extensions", "--disable-background-networking", "--disable-sync", "--hide-scrollbars",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-pipe"]
        flags += ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses to sandbox as root
        self.log_path = profile / "chromium.log"
        shell = f'exec "$0" "$@" 3<&{to_chromium} 4>&{from_chromium} {to_chromium}<&- {from_chromium}>&-'
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["bash", "-c", shell, binary, *flags],
                pass_fds=(to_chromium, from_chromium), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(to_chromium)
        os.close(from_chromium)
        self._out = os.fdopen(commands, "wb", buffering=0)
        self._in = os.fdopen(answers, "rb", buffering=0)
        self._lock = threading.Condition()
        self._answers: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._last_id, self._closed = 0, False
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for method in ("Page.enable", "Runtime.enable"):
            self.page(method)
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _read(self) -> None:
        buffer = b""
        while chunk := self._in.read(1 << 16):
            *messages, buffer = (buffer + chunk).split(b"\0")
            with self._lock:
                for message in map(json.loads, messages):
                    if "id" in message:
                        self._answers[message["id"]] = message
                    else:
                        self.events.append(message)
                self._lock.notify_all()
        self._in.close()  # Chromium has gone
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params: Any) -> dict[str, Any]:
        with self._lock:
            self._last_id += 1
            ident = self._last_id
        self._out.write(json.dumps({"id": ident, "method": method, "params": params,
                                    **({"sessionId": session} if session else {})}).encode() + b"\0")
        with self._lock:
            self._lock.wait_for(lambda: ident in self._answers or self._closed, timeout)
            answer = self._answers.pop(ident, None)
        if answer is None:
            raise AssertionError(f"Chromium did not answer {method} in {timeout} s (exit status "
                                 f"{self.process.poll()}); its log:\n{self.log_path.read_text(errors='replace')}")
        if "error" in answer:
            raise AssertionError(f"Chromium refused {method}: {answer['error']}")
        return answer["result"]

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, self.session, **params)

    def next_event(self, method: str, timeout: float = 30) -> dict[str, Any]:
        """The params of the first event ``method`` not taken yet (waiting for it)."""
        def first() -> dict[str, Any] | None:
            return next((e for e in self.events if e["method"] == method), None)
        with self._lock:
            assert self._lock.wait_for(first, timeout), f"no {method} event in {timeout} s"
            event = first()
            self.events.remove(event)
        return event["params"]

    def evaluate(self, expression: str) -> Any:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"the page never made {expression!r} true in {timeout} s"
            time.sleep(0.02)
        return value

    def open(self, url: str) -> None:
        with self._lock:
            self.events.clear()
        self.page("Page.navigate", url=url)
        self.next_event("Page.loadEventFired")

    def click(self, selector: str) -> None:
        """A left click in the middle of the element, as the mouse sends it (the element must be on top there)."""
        x, y = self.evaluate(f"""(() => {{ const el = document.querySelector({json.dumps(selector)});
            el.scrollIntoView({{block: "center"}}); const r = el.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def type(self, selector: str, text: str) -> None:
        """Click into the field, select what it holds and type ``text`` over it."""
        self.click(selector)
        self.evaluate(f"document.querySelector({json.dumps(selector)}).select()")
        self.page("Input.insertText", text=text)

    def errors(self) -> list[str]:
        """Uncaught exceptions and console errors of the page so far."""
        thrown = [e["params"]["exceptionDetails"] for e in self.events if e["method"] == "Runtime.exceptionThrown"]
        logged = [e["params"] for e in self.events
                  if e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] == "error"]
        return [str(d.get("exception", {}).get("description") or d["text"]) for d in thrown] + [
            " ".join(str(a.get("value", a.get("description"))) for a in p["args"]) for p in logged]

    def screenshot(self, path: str | Path) -> None:
        height = self.page("Page.getLayoutMetrics")["cssContentSize"]["height"]
        width = self.evaluate("window.innerWidth")
        shot = self.page("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                         clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
        Path(path).write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError):  # gone already
            self.call("Browser.close", timeout=10)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._out.close()


def _above_4(fd: int) -> int:
    """``fd`` moved to 10 or above, so that bash's ``3<&N 4>&M`` cannot overwrite one with the other."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved
