"""Real headless Chromium (Debian's `chromium`) driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: no port, no websocket library): load a page, run JavaScript in
it, screenshot parts of it, and collect what it logged and what it fetched."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from typing import Any

CHROMIUM = shutil.which("chromium")
WIDTH, HEIGHT = 800, 4000  # the viewport: every report fits in it, nothing scrolls


class Browser:
    def __init__(self) -> None:
        assert CHROMIUM is not None
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # The protocol's pipes are fds 3 (commands in) and 4 (replies out) in the browser:
        # move both ends out of the way first, so placing one cannot close the other.
        r, w = (
            fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10),
            fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10),
        )
        os.close(to_child_r)
        os.close(from_child_w)

        def place() -> None:
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=place, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(r)
        os.close(w)
        self._next = 0
        self._buffer = b""
        self.events: list[dict[str, Any]] = []
        self.session = ""

    def send(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply["result"]
                return result
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30, **match: Any) -> dict[str, Any]:
        """The first `method` event of the current session whose params include `match`.
        Events are kept (for errors() and requests()): unfiltered, the previous page's
        load would answer for this one."""

        def wanted(e: dict[str, Any]) -> bool:
            p = e.get("params", {})
            return (e.get("method") == method and e.get("sessionId") == self.session
                    and all(p.get(k) == v for k, v in match.items()))  # fmt: skip

        deadline = time.monotonic() + timeout
        for e in self.events:
            if wanted(e):
                return e
        while True:
            e = self._read(deadline)
            self.events.append(e)
            if wanted(e):
                return e

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited ({self.proc.poll()})")
            self._buffer += chunk
        msg, _, self._buffer = self._buffer.partition(b"\0")
        doc: dict[str, Any] = json.loads(msg)
        return doc

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        # One viewport taller than any report, set before the page lays out: a screenshot
        # then shows the layout getBoundingClientRect measured. (captureBeyondViewport
        # resizes the viewport for the capture: the scrollbar goes, the page reflows and
        # the clip lands tens of pixels off the element measured before.)
        self.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip
        self.send("Page.setLifecycleEventsEnabled", enabled=True)
        nav = self.send("Page.navigate", url=url)
        if nav.get("errorText"):
            raise RuntimeError(f"{url}: {nav['errorText']}")
        # This navigation's own load (its loaderId), not about:blank's or a previous page's.
        self.wait_for("Page.lifecycleEvent", name="load", frameId=nav["frameId"],
                      loaderId=nav["loaderId"])  # fmt: skip

    def evaluate(self, expression: str) -> Any:
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def screenshot(self, x: float, y: float, width: float, height: float) -> bytes:
        clip = {"x": x, "y": y, "width": width, "height": height, "scale": 1}
        assert y + height <= HEIGHT, "the page is taller than the viewport: raise HEIGHT"
        r = self.send("Page.captureScreenshot", format="png", clip=clip)
        return base64.b64decode(r["data"])

    def errors(self) -> list[str]:
        """What the page logged as an error, or threw."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(str(p["exceptionDetails"]))
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(str(p.get("args")))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text", ""))
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("method") == "Network.requestWillBeSent"]  # fmt: skip

    def close(self) -> None:
        # A browser that already died has nothing to close: the wait below reaps it.
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)
        shutil.rmtree(self.profile, ignore_errors=True)


def pixels(png: bytes) -> tuple[int, int, list[tuple[int, ...]]]:
    """(width, height, RGB(A) pixels) of an 8-bit RGB or RGBA PNG, as Chromium writes them."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, data, width, height, kind = 8, b"", 0, 0, 0
    while pos < len(png):
        (size,), tag = struct.unpack(">I", png[pos : pos + 4]), png[pos + 4 : pos + 8]
        body = png[pos + 8 : pos + 8 + size]
        if tag == b"IHDR":
            width, height, depth, kind = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and kind in (2, 6), (depth, kind)
        elif tag == b"IDAT":
            data += body
        pos += 12 + size
    n = 4 if kind == 6 else 3
    raw, stride = zlib.decompress(data), width * n
    rows: list[bytearray] = []
    prev = bytearray(stride)
    for r in range(height):
        f, line = (
            raw[r * (stride + 1)],
            bytearray(raw[r * (stride + 1) + 1 : (r + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - n] if i >= n else 0
            b, c = prev[i], prev[i - n] if i >= n else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        prev = line
    px = [tuple(row[i : i + n]) for row in rows for i in range(0, stride, n)]
    return width, height, px
