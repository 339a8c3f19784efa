"""Drive `anystep studio` in headless Chromium (Debian's chromium + chromium-driver, via Selenium).

Used by tests/test_studio.py, and run as a script it takes the README's screenshots and measures
the time to first frame:

    HF_HUB_OFFLINE=1 .venv/bin/python tests/studio_driver.py --far FAR_FOLDER --out docs/studio
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "models" / "toy-teacher"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None when it can."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found: install Debian's {package} (apt-get install chromium chromium-driver)"
    for module, extra in (("selenium", "test"), ("gradio", "studio")):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed: pip install -r requirements-studio.lock (the {extra} extra)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`anystep studio` in a child process on a free loopback port."""

    def __init__(self, models: list[str], log_path: Path, timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        cmd = [sys.executable, "-m", "anystep", "studio", "--port", str(self.port)]
        for m in models:
            cmd += ["--model", str(m)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"studio exited with {self.proc.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"studio did not answer on {self.url} within {timeout:.0f} s: {self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Page:
    """The studio page in headless Chromium, with the network requests it made."""

    def __init__(self, url: str, width: int = 1280, height: int = 900):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = tempfile.mkdtemp(prefix="anystep-chromium-")
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        # The flags that keep Chromium off the network it would call home to by itself.
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
                     f"--user-data-dir={self.profile}", f"--window-size={width},{height}"):
            opts.add_argument(flag)
        opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
        self.driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
        self.driver.set_script_timeout(30)
        self.requested: list[str] = []
        self.driver.get(url)
        self.wait(lambda: self.js("return !!document.querySelector('#generate button, button#generate')"), 60,
                  "the page's Generate button")

    def close(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, condition, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.02)
        raise TimeoutError(f"waited {timeout:.0f} s for {what}")

    def urls(self) -> list[str]:
        """Every web (http, https, ws) URL the page has requested so far."""
        for entry in self.driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg.get("method") in ("Network.requestWillBeSent", "Network.webSocketCreated"):
                url = msg["params"].get("request", msg["params"]).get("url", "")
                if url.split(":", 1)[0] in ("http", "https", "ws", "wss"):
                    self.requested.append(url)
        return self.requested

    # --- inputs ---

    def type_into(self, elem_id: str, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.driver.find_element("css selector", f"#{elem_id} textarea, #{elem_id} input")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)
        if text:
            box.send_keys(text)
        box.send_keys(Keys.TAB)  # Gradio takes a number box's value when it loses focus

    def set_steps(self, elem_id: str, steps: int) -> None:
        self.type_into(elem_id, str(steps))
        self.wait(lambda: self.js(f"return document.querySelector('#{elem_id} input[type=range]').value") == str(steps),
                  10, f"the steps slider to show {steps}")

    def tab(self, title: str) -> None:
        for button in self.driver.find_elements("css selector", "button[role=tab]"):
            if button.text.strip() == title:
                button.click()
                return
        raise LookupError(f"no tab {title!r}")

    def upload(self, elem_id: str, path) -> None:
        field = self.driver.find_element("css selector", f"#{elem_id} input[type=file]")
        field.send_keys(str(Path(path).resolve()))

    def click(self, elem_id: str) -> None:
        self.driver.find_element("css selector", f"#{elem_id}").click()

    # --- outputs ---

    def video(self, elem_id: str) -> dict | None:
        return self.js(
            "const v = document.querySelector(arguments[0] + ' video');"
            "return v && v.currentSrc ? {src: v.currentSrc, ready: v.readyState, duration: v.duration,"
            " error: v.error && v.error.code, width: v.videoWidth, height: v.videoHeight} : null;", f"#{elem_id}")

    def text(self, elem_id: str) -> str:
        """What a Markdown or Textbox shows (not the label, not the status timer)."""
        return self.js(
            "const e = document.querySelector(arguments[0]); if (!e) return '';"
            "const box = e.querySelector('textarea, input'); if (box) return box.value.trim();"
            "const md = e.querySelector('[data-testid=markdown]'); return (md || e).innerText.trim();", f"#{elem_id}")

    def visible(self, elem_id: str) -> bool:
        return bool(self.js("const e = document.querySelector(arguments[0]); return !!e && e.offsetParent !== null;",
                            f"#{elem_id}"))

    def generate(self, button: str, video: str, timeout: float = 120) -> tuple[dict, float]:
        """Click ``button``; wait until ``video`` shows a new clip whose first frame is decoded.
        Returns its state and the seconds from the click to that first frame."""
        before, said = (self.video(video) or {}).get("src"), self.text("message")
        start = time.perf_counter()
        self.click(button)

        def first_frame():
            state = self.video(video)
            message = self.text("message")  # read once: the page may redraw it between two reads
            if message.startswith("Cannot") and message != said:
                raise AssertionError(f"the page says: {message}")
            return state if state and state["src"] != before and state["ready"] >= 2 else None

        state = self.wait(first_frame, timeout, f"a new clip in #{video}")
        return state, time.perf_counter() - start

    def message(self, button: str, timeout: float = 60) -> str:
        """Click ``button`` and wait for the page's message to change to a new one."""
        before = self.text("message")
        self.click(button)
        return self.wait(lambda: self.text("message") not in ("", before) and self.text("message"), timeout,
                         "a new message in the page")

    def screenshot(self, path, height: int | None = None) -> None:
        if height:
            self.driver.set_window_size(1280, height)
        self.js("window.scrollTo(0, 0)")
        time.sleep(0.5)
        self.driver.save_screenshot(str(path))


def off_machine(urls: list[str]) -> list[str]:
    from urllib.parse import urlsplit

    return [u for u in urls if urlsplit(u).hostname not in ("127.0.0.1", "localhost")]


def first_frame_png(path: Path, color: str, digit: int, direction: str, size: int = 32) -> Path:
    """The first frame of a held-out toy clip, as a PNG (``size`` other than 32: a wrong-size image)."""
    import imageio.v2 as imageio
    import numpy as np

    from anystep.data.moving_digits import MovingDigits

    video = MovingDigits("heldout").clip_for(color, digit, direction, seed=0).video
    img = ((video[0].transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)
    imageio.imwrite(path, img.repeat(size // 32, axis=0).repeat(size // 32, axis=1) if size != 32 else img)
    return path


def time_to_first_frame(page: Page, repeats: int) -> None:
    """Click to first decoded frame in the page, at 1 and 4 steps, after one warm-up each
    (prints the median, the range, and the server's own wall time for the clip)."""
    import statistics

    for steps in (1, 4):
        page.set_steps("steps", steps)
        page.generate("generate", "video")  # warm-up: first-call costs are not what a person waits for
        seen, walls = [], []
        for seed in range(1, repeats + 1):  # a new seed each click: a new clip, as when exploring
            page.type_into("seed", str(seed))
            _, seconds = page.generate("generate", "video")
            seen.append(seconds)
            walls.append(float(page.text("stats").split(" s", 1)[0]))
        print(f"time to first frame, {steps} step(s), {repeats} clicks: median {statistics.median(seen):.2f} s "
              f"(min {min(seen):.2f}, max {max(seen):.2f}); sampling + decoding on the server: median "
              f"{statistics.median(walls):.2f} s", flush=True)


def _screenshots(far: str, out: Path, repeats: int) -> None:
    """The README's three screenshots, and the time to first frame at 1 and 4 steps."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server([str(TEACHER), far], Path(tmp) / "server.log")
        page = Page(server.url)
        try:
            time_to_first_frame(page, repeats)
            page.type_into("seed", "0")
            page.generate("generate", "video")
            time.sleep(1)
            page.screenshot(out / "single.png", 1080)
            page.tab("Compare steps")
            page.click("compare")
            page.wait(lambda: page.js("return [...document.querySelectorAll('[id^=compare-] video')]"
                                      ".filter(v => v.readyState >= 2).length") == 10, 300, "the whole comparison")
            time.sleep(2)
            page.screenshot(out / "compare.png", 1110)
            page.tab("Image to video (FAR)")
            page.type_into("prompt", "a yellow two moving right")
            frame = first_frame_png(Path(tmp) / "first_frame.png", "yellow", 2, "right")
            page.upload("i2v-image", frame)
            page.set_steps("i2v-steps", 8)
            page.generate("i2v-generate", "i2v-video")
            page.wait(lambda: "chunk 5/5" in page.text("i2v-stats"), 120, "every chunk")
            time.sleep(2)
            page.screenshot(out / "far_i2v.png", 1200)
            outside = off_machine(page.urls())
            print(f"requests off this machine: {outside or 'none'}")
        finally:
            page.close()
            server.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--far", required=True, help="an AnyFlow-FAR folder for the image-to-video screenshot")
    ap.add_argument("--out", default=str(REPO / "docs" / "studio"))
    ap.add_argument("--repeats", type=int, default=5, help="clicks per step count for the time to first frame")
    args = ap.parse_args()
    if why := browser_missing():
        sys.exit(f"studio_driver: {why}")
    _screenshots(args.far, Path(args.out), args.repeats)
