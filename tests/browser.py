"""Open a local HTML file in headless Chromium and report what a user's browser would see.

Drives Chromium over the DevTools protocol (a minimal stdlib WebSocket client: Python has none
built in), so console errors, uncaught exceptions, failed loads and every network request are
caught as events rather than scraped from log text. Used by tests/test_reports.py.
Debian package: `apt-get install -y chromium`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--remote-debugging-port=0", "--remote-allow-origins=*",
)


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable, or None when none is installed."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageVisit:
    """What loading one page produced."""

    screenshot_png: bytes = b""
    errors: list[str] = field(default_factory=list)     # console errors, exceptions, failed loads
    requests: list[str] = field(default_factory=list)   # every URL the page asked for (itself included)
    title: str = ""


class _WebSocket:
    """Just enough of RFC 6455 for a DevTools session: masked text frames out, frames in."""

    def __init__(self, url: str, timeout: float):
        assert url.startswith("ws://"), url
        host_port, _, path = url[len("ws://"):].partition("/")
        host, _, port = host_port.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the WebSocket handshake")
            response += chunk
        head, _, self.buffer = response.partition(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"WebSocket handshake refused: {head[:200]!r}")

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("DevTools WebSocket closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send(self, text: str) -> None:
        payload = text.encode()
        header = bytearray([0x81])  # FIN + text frame
        n = len(payload)
        if n < 126:
            header.append(0x80 | n)
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(bytes(header) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def receive(self) -> str:
        message = b""
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            opcode = first & 0x0F
            if opcode == 0x9:  # ping: answer so the browser keeps us
                self.sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("DevTools WebSocket closed by the browser")
            message += payload
            if first & 0x80:
                return message.decode()


def visit(path: str | Path, width: int = 1280, height: int = 1000, timeout: float = 60.0,
          chromium: str | None = None) -> PageVisit:
    """Load file `path` in headless Chromium; return its screenshot, errors and requested URLs."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found; on Debian: apt-get install -y chromium")
    url = Path(path).resolve().as_uri()
    profile = tempfile.mkdtemp(prefix="report-browser-")
    process = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                f"--window-size={width},{height}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        port_file = Path(profile) / "DevToolsActivePort"
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Chromium did not open its DevTools port (exit code {process.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as response:
            targets = [t for t in json.load(response) if t.get("type") == "page"]
        ws = _WebSocket(targets[0]["webSocketDebuggerUrl"], timeout=timeout)
        result = PageVisit()
        next_id = iter(range(1, 1 << 30))

        def call(method: str, **params):
            call_id = next(next_id)
            ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
            while True:
                message = json.loads(ws.receive())
                if message.get("id") == call_id:
                    if "error" in message:
                        raise RuntimeError(f"DevTools {method} failed: {message['error']}")
                    return message.get("result", {})
                record(message)

        loaded = []

        def record(message: dict) -> None:
            method, params = message.get("method"), message.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                result.errors.append("exception: " + str(details.get("exception", {}).get("description")
                                                         or details.get("text")))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                result.errors.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                                  for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                result.errors.append("log: " + str(params["entry"].get("text")))
            elif method == "Network.requestWillBeSent":
                result.requests.append(params.get("request", {}).get("url", ""))
            elif method == "Network.loadingFailed":
                result.errors.append("failed load: " + str(params.get("errorText")))
            elif method == "Page.loadEventFired":
                loaded.append(True)

        for domain in ("Runtime", "Log", "Network", "Page"):
            call(f"{domain}.enable")
        call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        call("Page.navigate", url=url)
        while not loaded:
            if time.monotonic() > deadline:
                raise TimeoutError(f"page {url} did not finish loading in {timeout} s")
            record(json.loads(ws.receive()))
        # Let late console messages / errors from the load arrive before the screenshot.
        call("Runtime.evaluate", expression="new Promise(r => setTimeout(r, 200))", awaitPromise=True)
        result.title = call("Runtime.evaluate", expression="document.title").get("result", {}).get("value", "")
        result.screenshot_png = base64.b64decode(call("Page.captureScreenshot", format="png")["data"])
        return result
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)


def non_background_fraction(png: bytes) -> float:
    """Fraction of screenshot pixels that differ from its most common colour (0.0 = a blank page)."""
    import io  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    return float((np.abs(pixels.astype(int) - background).sum(axis=1) > 30).mean())
