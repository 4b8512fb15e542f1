"""A real headless Chromium driven over the DevTools protocol, for tests of HTML we produce.

Why the DevTools protocol rather than ``--dump-dom``: whether an ``<img>`` actually decoded is only
known to the page (``naturalWidth``), and our pages forbid scripts by Content-Security-Policy, so the
test must ask from outside the page (``Runtime.evaluate`` is not subject to the page's CSP). Chromium
comes from Debian's package (``apt-get install -y chromium``); a missing browser fails the test.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from websockets.sync.client import connect

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
)


class BrowserNotInstalled(RuntimeError):
    pass


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise BrowserNotInstalled("Chromium is not installed: run `apt-get install -y chromium` (Debian)")


class Chromium:
    """One headless Chromium with a fresh profile under ``workdir``; use as a context manager."""

    def __init__(self, workdir: Path, *, width: int = 1280, height: int = 2000) -> None:
        self.profile = Path(workdir) / "chromium-profile"
        self.width, self.height = width, height
        self.process: subprocess.Popen | None = None
        self._ids = itertools.count(1)

    def __enter__(self) -> Chromium:
        self.profile.mkdir(parents=True)
        self.process = subprocess.Popen(
            [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("Chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json() if t["type"] == "page"]
        self._stack = contextlib.ExitStack()
        self._socket = self._stack.enter_context(
            connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        )
        self.call("Page.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._stack.close()
        finally:
            if self.process is not None:
                self.process.kill()
                self.process.wait(timeout=30)

    def call(self, method: str, params: dict[str, Any] | None = None, *, wait_event: str | None = None) -> dict:
        """Send one command; return its result (after ``wait_event`` arrived too, when given)."""
        message_id = next(self._ids)
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params or {}}))
        result: dict | None = None
        event_seen = wait_event is None
        while result is None or not event_seen:
            message = json.loads(self._socket.recv(timeout=60))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result = message["result"]
            elif message.get("method") == wait_event:
                event_seen = True
        return result

    def open(self, url: str) -> None:
        self.call("Page.navigate", {"url": url}, wait_event="Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        reply = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return reply["result"].get("value")

    def screenshot(self) -> bytes:
        """PNG of the whole viewport."""
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])
