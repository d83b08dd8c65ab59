"""TensorBoard as a user sees it: screenshots of the Time Series, Custom Scalars and HParams views.

    python -m launch.tensorboard_shots [--out reports/tensorboard] [--logdir DIR]

Without --logdir it trains two small runs that differ only in the learning rate (so HParams has something to
compare) into a temporary folder. It then starts TensorBoard on 127.0.0.1 at a free port and headless Chromium
(Debian's `chromium`, installed with apt-get when missing and this is root), drives Chromium over the DevTools
protocol (a small WebSocket client below: the standard library only), waits on each view until the page really
shows the data (polled: the run names, the tags and drawn chart lines in the page, shadow DOM included), and saves
one PNG per view under --out. Both servers are tracked by pid and killed on every way out.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from launch.runner import run as run_train
from spine.errors import UsageError
from spine.logger import HPARAM_METRICS

TENSORBOARD = str(Path(sys.executable).with_name("tensorboard"))
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
RUNS = [("lr-0.01", ["--lr", "0.01"]), ("lr-0.001", ["--lr", "0.001"])]
RECIPE = ["--epochs", "40", "--print-every", "1000", "--threads", "1", "--checkpoint-every-seconds", "0"]
WIDTH, HEIGHT = 1400, 1000

# Everything in the page as one string, reaching into shadow roots (TensorBoard's Polymer dashboards), and the number
# of chart lines drawn (SVG paths with data) and canvases.
PAGE_STATE_JS = r"""
(() => {
  const text = [];
  let lines = 0, canvases = 0;
  const walk = (node) => {
    if (node.nodeType === 3) { text.push(node.textContent); return; }
    if (node.nodeType !== 1 && node.nodeType !== 9 && node.nodeType !== 11) return;
    if (node.tagName === 'path' && node.closest && node.closest('.line, .line-chart, svg')
        && (node.getAttribute('d') || '').length > 20) lines++;
    if (node.tagName === 'CANVAS' && node.width > 0 && node.height > 0) canvases++;
    if (node.shadowRoot) walk(node.shadowRoot);
    if (node.tagName === 'IFRAME') { try { walk(node.contentDocument); } catch (e) {} }
    for (const child of node.childNodes) walk(child);
  };
  walk(document);
  return JSON.stringify({text: text.join(' ').replace(/\s+/g, ' '), lines: lines, canvases: canvases});
})()
"""


# --- a minimal WebSocket client (RFC 6455), enough for the DevTools protocol ------------------------------------


class DevTools:
    """One DevTools target over a WebSocket: `call(method, **params)` returns the result, skipping events."""

    def __init__(self, ws_url: str, timeout: float) -> None:
        url = urlparse(ws_url)
        self.sock = socket.create_connection((url.hostname, url.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {url.path} HTTP/1.1\r\nHost: {url.hostname}:{url.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"DevTools refused the WebSocket: {head.splitlines()[0]!r}")
        self._buffer = head.split(b"\r\n\r\n", 1)[1]
        self._next_id = 0

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)  # a client must mask every frame
        n = len(payload)
        size = bytes([0x80 | n]) if n < 126 else (bytes([0x80 | 126]) + struct.pack(">H", n) if n < 1 << 16
                                                  else bytes([0x80 | 127]) + struct.pack(">Q", n))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode]) + size + mask + masked)

    def _message(self) -> dict:
        parts: list[bytes] = []
        while True:
            first, second = self._read(2)
            opcode, n = first & 0x0F, second & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)  # the server never masks
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
            elif opcode == 0x8:
                raise ConnectionError("DevTools closed the WebSocket")
            elif opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if first & 0x80:  # FIN: the message is complete
                    return json.loads(b"".join(parts))

    def call(self, method: str, **params) -> dict:
        self._next_id += 1
        self._send_frame(0x1, json.dumps({"id": self._next_id, "method": method, "params": params}).encode())
        while True:
            message = self._message()
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def close(self) -> None:
        self.sock.close()


# --- processes ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process(cmd: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """A server in its own process group, killed (the group, by its pid) however the block ends."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def poll(what: str, probe, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    """probe() until it returns something truthy; the last value seen goes into the error on timeout."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log else ""
            raise RuntimeError(f"{what}: the process exited with code {proc.returncode}\n{tail}")
        try:
            last = probe()
        except (OSError, ValueError, ConnectionError) as e:
            last = e
        else:
            if last and not isinstance(last, Exception):
                return last
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s (last: {str(last)[:500]})")


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def find_browser(install: bool) -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    if not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        raise UsageError("no Chromium found: install Debian's chromium (apt-get install -y chromium), or run as root "
                         "to let this script install it")
    print("installing chromium with apt-get (once) ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        subprocess.run(cmd, check=True, env=env, timeout=900, stdout=subprocess.DEVNULL)
    return shutil.which("chromium") or ""


# --- the views ---------------------------------------------------------------------------------------------------


def views(runs: list[str]) -> list[tuple[str, str, object, tuple[int, int]]]:
    """(file name, URL after the host, page-state check, window size) per view; a check returns what is still
    missing, or None."""

    def needs(texts: list[str], lines: int = 0, canvases: int = 0):
        def missing(state: dict) -> str | None:
            absent = [t for t in texts if t not in state["text"]]
            if absent:
                return f"text {absent}"
            if state["lines"] < lines:
                return f"{state['lines']} of {lines} chart lines"
            if state["canvases"] < canvases:
                return f"{state['canvases']} of {canvases} chart canvases"
            return None
        return missing

    return [
        # The view a user lands on: the tag groups by name, the first two expanded. forceSVG is TensorBoard's own
        # switch from WebGL to SVG charts: headless Chromium draws no lines on its WebGL canvases (checked: axes,
        # no data), the SVG ones show the same series.
        # It opens on accuracy/ and loss/ (train and val each): four cards, a raw and a smoothed line per run.
        ("time_series", "?forceSVG=true#timeseries", needs(runs + [" cards "], lines=4 * 2 * len(runs)),
         (WIDTH, 1500)),
        # One line per run per chart: loss and accuracy, train and val.
        ("custom_scalars", "#custom_scalars", needs(["train vs val"], lines=2 * len(runs)), (WIDTH, 800)),
        # The table: one row per run, its hyperparameters and each metric's last value; wide enough for all five
        # metric columns.
        ("hparams", "#hparams", needs(runs + ["lr", "world_size"] + [title for _, title, _ in HPARAM_METRICS]),
         (2400, 800)),
    ]


def screenshots(logdir: Path, out: Path, runs: list[str], timeout: float, install: bool) -> list[Path]:
    browser = find_browser(install)
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="tb-shots-"))
    saved = []
    try:
        with process([TENSORBOARD, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port),
                      "--reload_interval", "1"], work / "tensorboard.log") as tb:
            base = f"http://127.0.0.1:{port}"
            # Ready when the server lists every run: the event files have been read.
            poll("TensorBoard", lambda: set(runs) <= set(get_json(f"{base}/data/runs")), timeout, tb,
                 work / "tensorboard.log")
            profile = work / "chromium-profile"
            # --no-sandbox: Chromium refuses to run as root otherwise; every chart is SVG, so no GPU is needed.
            with process([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                          "--mute-audio", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                          f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
                         work / "chromium.log") as chrome:
                port_file = profile / "DevToolsActivePort"
                cdp_port = poll("Chromium", lambda: port_file.exists() and port_file.read_text().split()[0], timeout,
                                chrome, work / "chromium.log")
                pages = poll("Chromium's page", lambda: [t for t in get_json(f"http://127.0.0.1:{cdp_port}/json/list")
                                                         if t["type"] == "page"], timeout, chrome)
                tab = DevTools(pages[0]["webSocketDebuggerUrl"], timeout)
                try:
                    for name, fragment, missing, (width, height) in views(runs):
                        tab.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                                 deviceScaleFactor=1, mobile=False)
                        tab.call("Page.navigate", url=f"{base}/{fragment}")

                        def ready(check=missing) -> bool:
                            state = json.loads(tab.call("Runtime.evaluate", expression=PAGE_STATE_JS,
                                                        returnByValue=True)["result"]["value"])
                            gap = check(state)
                            if gap:
                                raise ValueError(f"still missing {gap}")
                            return True

                        poll(f"the {name} view", ready, timeout, chrome)
                        time.sleep(1.5)  # the data are in the page; let the charts finish their transition
                        png = base64.b64decode(tab.call("Page.captureScreenshot", format="png")["data"])
                        path = out / f"{name}.png"
                        path.write_bytes(png)
                        saved.append(path)
                        print(f"{path}  ({len(png) // 1024} KiB)", flush=True)
                        # A fresh page per view: TensorBoard keeps state across its tabs otherwise.
                        tab.call("Page.navigate", url="about:blank")
                finally:
                    tab.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return saved


def train_runs(root: Path) -> Path:
    for name, flags in RUNS:
        record = run_train(RECIPE + flags, root, name, in_process=False, timeout=300)
        if record.returncode != 0:
            raise RuntimeError(f"run {name} failed (exit {record.returncode}):\n{record.output[-2000:]}")
        print(f"trained {name}: {record.summary['epochs_completed']} epochs, final val loss "
              f"{record.summary['final']['val_loss']:.4g}", flush=True)
    return root / "runs"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="reports/tensorboard", help="folder for the PNGs")
    p.add_argument("--logdir", help="a runs folder to show instead of training two small runs")
    p.add_argument("--timeout", type=float, default=90, help="seconds each wait (server, browser, view) may take")
    p.add_argument("--no-install", action="store_true", help="fail instead of installing a missing Chromium")
    args = p.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="tb-runs-") as tmp:
            if args.logdir:
                logdir = Path(args.logdir)
                if not logdir.is_dir():
                    raise UsageError(f"--logdir {logdir}: no such folder")
            else:
                logdir = train_runs(Path(tmp))
            runs = sorted(p.parent.relative_to(logdir).as_posix() for p in logdir.rglob("events.out.tfevents.*"))
            if not runs:
                raise UsageError(f"--logdir {logdir}: no TensorBoard event files in it")
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            screenshots(logdir, out, sorted(set(runs)), args.timeout, not args.no_install)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError, ConnectionError, subprocess.SubprocessError) as e:
        print(f"error: {e}", file=sys.stderr)  # the servers are already killed
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
