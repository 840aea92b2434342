"""Headless Chromium over the DevTools protocol: open a page at a given width, measure, shoot.

One browser serves every page (starting Chromium costs about a second). Debian's ``chromium``
package provides it (``.ci/run`` installs it); tests skip when it is missing on a developer box.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

# What a reader would see run off the page: the document wider than the window, and the elements
# sticking out (outside any box that scrolls on its own).
LAYOUT_JS = """(() => {
  const w = window.innerWidth, de = document.documentElement;
  const inScroller = el => { for (let p = el.parentElement; p; p = p.parentElement) {
      const o = getComputedStyle(p).overflowX; if (o === 'auto' || o === 'scroll') return true; }
    return false; };
  const off = [...document.body.querySelectorAll('*')].filter(el => {
      const r = el.getBoundingClientRect(); return r.width && r.right > w + 1 && !inScroller(el); })
    .slice(0, 5).map(el => el.tagName.toLowerCase() + (el.className ? '.' + el.className : '')
      + ' right=' + Math.round(el.getBoundingClientRect().right));
  const imgs = [...document.images];
  return {scrollWidth: de.scrollWidth, innerWidth: w, offenders: off, images: imgs.length,
    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
    smoothed: imgs.filter(i => getComputedStyle(i).imageRendering !== 'pixelated').length,
    remote: performance.getEntriesByType('resource').map(e => e.name)
      .filter(n => !n.startsWith('file:') && !n.startsWith('data:'))};
})()"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


class Browser:
    """A headless Chromium this process started (and stops, by its process id)."""

    def __init__(self, binary: str):
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="meddiff-chromium-")
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--mute-audio",
                "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
                "--allow-file-access-from-files", "about:blank"]  # fmt: skip
        self.proc = subprocess.Popen(
            args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            start_new_session=True,
        )  # fmt: skip
        url = self._devtools_url()
        browser = connect(url, max_size=2**28, open_timeout=30)
        self._ids = itertools.count(1)
        target = self._call(browser, "Target.createTarget", url="about:blank")["targetId"]
        port = re.search(r":(\d+)/", url).group(1)
        self.ws = connect(f"ws://127.0.0.1:{port}/devtools/page/{target}", max_size=2**28)
        browser.close()
        self.call("Page.enable")

    def _devtools_url(self, timeout: float = 60) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.proc.returncode}")
            if m := re.search(r"DevTools listening on (ws://\S+)", line):
                return m.group(1)
        raise RuntimeError("chromium did not open its DevTools port")

    def _call(self, ws, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(ws.recv(timeout=60))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self._call(self.ws, method, **params)

    def open(self, page: Path, width: int, height: int = 900) -> dict[str, Any]:
        """Load ``page`` in a ``width``-px window (phone widths as a mobile viewport) and return
        the measurements of :data:`LAYOUT_JS`."""
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=width < 600)  # fmt: skip
        self.events.clear()
        self.call("Page.navigate", url=page.resolve().as_uri())
        end = time.monotonic() + 60
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > end:
                raise RuntimeError(f"{page} did not finish loading")
            self.events.append(json.loads(self.ws.recv(timeout=60)))
        result = self.call("Runtime.evaluate", expression=LAYOUT_JS, returnByValue=True)
        return result["result"]["value"]

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"],
                              "height": min(size["height"], 6000), "scale": 1}  # fmt: skip
        data = self.call("Page.captureScreenshot", **params)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group Chromium made for itself
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
            shutil.rmtree(self.profile, ignore_errors=True)
