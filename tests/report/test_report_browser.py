"""Open report.html in a real headless Chromium and check that the tables and every image render,
with no network request. Talks the DevTools protocol over a pipe (--remote-debugging-pipe), so
no Python browser-driver package is needed. Skips when Debian's `chromium` is not installed
(scripts/system-deps.sh installs it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from loralab.report.write import write_report
from loralab.study.runner import run_study
from loralab.study.spec import parse_study

pytestmark = pytest.mark.slow

CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium",
                             shutil.which("chromium-browser")) if p and Path(p).exists()), None)


class DevTools:
    """A minimal CDP client over Chromium's debugging pipe (fd 3: commands in, fd 4: out)."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # the child sees our read end of "to chrome" as fd 3 and the write end of "from" as fd 4
        # (pass_fds keeps 3 and 4 open: the fd cleanup runs after preexec_fn)
        def child_fds() -> None:
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4, to_chrome_r, from_chrome_w), preexec_fn=child_fds,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        raise TimeoutError(method)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for e in self.events:
            if e.get("method") == method:
                return e
        while time.monotonic() < deadline:
            e = self._read()
            self.events.append(e)
            if e.get("method") == method:
                return e
        raise TimeoutError(method)

    def _read(self) -> dict:
        while b"\0" not in self._buf:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the debugging pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


CHECK_JS = """(() => {
  const imgs = [...document.images].map(i => ({alt: i.alt, complete: i.complete,
      w: i.naturalWidth, h: i.naturalHeight, shown: i.getBoundingClientRect().width}));
  const tables = [...document.querySelectorAll('table')].map(t => ({
      rows: t.tBodies[0] ? t.tBodies[0].rows.length : 0,
      cols: t.tHead ? t.tHead.rows[0].cells.length : 0,
      height: t.getBoundingClientRect().height,
      bold: t.querySelectorAll('b').length}));
  return JSON.stringify({imgs, tables, title: document.title,
      text: document.body.innerText.length});
})()"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/system-deps.sh)")
@pytest.mark.parametrize("which", ["plain", "quant"])
def test_report_renders_in_headless_chromium(tmp_path, which):
    import report_studies as test_report

    text, run_fn, title, n_tables = (
        (test_report.STUDY, test_report.recorded_run, "rep", 4) if which == "plain" else
        # quality, cost, deployment (float/PTQ/QAT/QLoRA), quantization details, runs
        (test_report.QSTUDY, test_report.quant_record, "q", 5))
    out = tmp_path / "study"
    run_study(parse_study(text), out, run_fn=run_fn, progress=lambda m: None)
    write_report(out)
    page = (out / "report.html").resolve()

    cdp = DevTools(CHROMIUM, tmp_path / "profile")
    try:
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True}
                           )["sessionId"]
        cdp.send("Network.enable", session=session)
        cdp.send("Page.enable", session=session)
        cdp.send("Page.navigate", {"url": page.as_uri()}, session=session)
        cdp.wait_event("Page.loadEventFired")
        result = cdp.send("Runtime.evaluate", {"expression": CHECK_JS, "returnByValue": True},
                          session=session)
        state = json.loads(result["result"]["value"])
    finally:
        cdp.close()

    assert state["title"] == f"loralab study: {title}"
    # every image decoded and laid out (a broken image has naturalWidth 0)
    assert len(state["imgs"]) == 5
    for img in state["imgs"]:
        assert img["complete"] and img["w"] > 0 and img["h"] > 0 and img["shown"] > 0, img
    # quality, cost, (quantization) and runs tables, with rows, columns and bold best values
    assert len(state["tables"]) == n_tables
    assert all(t["rows"] >= 3 and t["cols"] >= 4 and t["height"] > 0 for t in state["tables"])
    assert state["tables"][0]["bold"] >= 1
    # no network: the only request is the file itself (data: images are not requests)
    urls = [e["params"]["request"]["url"] for e in cdp.events
            if e.get("method") == "Network.requestWillBeSent"]
    assert urls and all(u.startswith(("file://", "data:")) for u in urls), urls
