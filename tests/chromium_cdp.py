"""Drive headless Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe; stdlib
only): load a page, collect console errors, uncaught exceptions and log-domain errors (e.g. CSP
violations), read the rendered text, evaluate JavaScript expressions (layout measurements) and take
a full-page PNG screenshot."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-pipe", "--hide-scrollbars",
]  # fmt: skip


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


@dataclass
class PageResult:
    errors: list[str] = field(default_factory=list)
    text: str = ""
    png: bytes = b""
    height: int = 0
    values: dict[str, Any] = field(default_factory=dict)  # name -> result of load_page(evaluate=...)


class _Pipe:
    def __init__(self, binary: str, user_dir: str):
        to_r, to_w = os.pipe()  # we write commands -> chromium reads fd 3
        from_r, from_w = os.pipe()  # chromium writes fd 4 -> we read

        def child() -> None:
            os.dup2(to_r, 3)
            os.dup2(from_w, 4)

        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={user_dir}", "about:blank"],
            pass_fds=(3, 4),
            preexec_fn=child,  # keep 3 and 4 (set by child(), which runs first) stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_r)
        os.close(from_w)
        self.w, self.r = to_w, from_r
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def _read_one(self, deadline: float) -> dict:
        import select

        while b"\0" not in self.buf:
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        i = self.send(method, params, session)
        deadline = time.time() + timeout
        while True:
            m = self._read_one(deadline)
            if m.get("id") == i:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        for k, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(k)
        deadline = time.time() + timeout
        while True:
            m = self._read_one(deadline)
            if m.get("method") == method:
                return m
            self.events.append(m)

    def drain(self, seconds: float) -> None:
        deadline = time.time() + seconds
        try:
            while True:
                self.events.append(self._read_one(deadline))
        except TimeoutError:
            pass

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.w)
        os.close(self.r)


def _describe(e: dict) -> str | None:
    m, p = e.get("method"), e.get("params", {})
    if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
        return "console.error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
    if m == "Runtime.exceptionThrown":
        d = p.get("exceptionDetails", {})
        return "exception: " + str((d.get("exception") or {}).get("description") or d.get("text"))
    if m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
        return "log: " + str(p["entry"].get("text"))
    return None


def load_page(
    path: str | Path,
    *,
    width: int = 1280,
    screenshot: bool = True,
    binary: str | None = None,
    evaluate: dict[str, str] | None = None,
) -> PageResult:
    """Load `path` in a `width`-px-wide viewport. `evaluate`: name -> JavaScript expression, each
    evaluated after load with its JSON-serialisable result in `PageResult.values[name]`; an
    expression that throws raises RuntimeError naming it."""
    binary = binary or find_chromium()
    if not binary:
        raise FileNotFoundError("chromium not found (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="curate-chromium-") as user_dir:
        pipe = _Pipe(binary, user_dir)
        try:
            targets = pipe.call("Target.getTargets")["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            sid = pipe.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
            for dom in ("Runtime.enable", "Log.enable", "Page.enable"):
                pipe.call(dom, session=sid)
            pipe.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                session=sid,
            )
            pipe.call("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=sid)
            pipe.wait_event("Page.loadEventFired", timeout=60)
            pipe.drain(0.5)  # late console messages
            res = PageResult()
            res.text = pipe.call(
                "Runtime.evaluate", {"expression": "document.body.innerText", "returnByValue": True}, session=sid
            )["result"].get("value", "")
            # before the height: an expression may change the layout (open <details>, ...)
            for name, expression in (evaluate or {}).items():
                out = pipe.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=sid)
                if "exceptionDetails" in out:
                    raise RuntimeError(f"evaluate {name!r} threw: {out['exceptionDetails']}")
                res.values[name] = out["result"].get("value")
            res.height = int(
                pipe.call(
                    "Runtime.evaluate",
                    {"expression": "document.documentElement.scrollHeight", "returnByValue": True},
                    session=sid,
                )["result"]["value"]
            )
            if screenshot:
                shot = pipe.call(
                    "Page.captureScreenshot",
                    {
                        "format": "png",
                        "captureBeyondViewport": True,
                        "clip": {"x": 0, "y": 0, "width": width, "height": min(res.height, 16000), "scale": 1},
                    },
                    session=sid,
                    timeout=60,
                )
                res.png = base64.b64decode(shot["data"])
            pipe.drain(0.2)
            res.errors = [d for d in map(_describe, pipe.events) if d]
            return res
        finally:
            pipe.close()
