"""Load an HTML page in headless Chromium and report what a reader would see: console messages and
errors, images that did not decode, and the page height. No driver library: a copy of the page gets
a small inline script that writes its findings into the DOM, Chromium's ``--dump-dom`` prints the DOM
after load, and Chromium's own log (stderr) carries every console message."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000")
PROBE = """<script id="kc-probe">
window.__kcErrors = [];
window.addEventListener("error", function (e) {
  window.__kcErrors.push(e.message || ("failed to load " + (e.target && (e.target.src || e.target.href))));
}, true);
var __kcConsoleError = console.error;
console.error = function () { window.__kcErrors.push([].join.call(arguments, " ")); __kcConsoleError.apply(console, arguments); };
window.addEventListener("load", function () {
  var imgs = [].slice.call(document.images);
  var out = {images: imgs.length, decoded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
             widths: imgs.map(function (i) { return i.naturalWidth; }),
             height: document.documentElement.scrollHeight, errors: window.__kcErrors};
  var pre = document.createElement("pre");
  pre.id = "kc-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    path = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).is_file() else None)
    if not path:
        raise RuntimeError("headless Chromium is needed to check the report in a browser: install Debian's "
                           "chromium (apt-get install -y chromium; .ci/run does it)")
    return path


def check_page(html: Path, work: Path, timeout: float = 120) -> dict:
    """Load ``html`` headless; return {images, decoded, widths, height, errors, console}."""
    work.mkdir(parents=True, exist_ok=True)
    page = work / "probe.html"
    text = html.read_text()
    head = text.index("<head>") + len("<head>")
    page.write_text(text[:head] + PROBE + text[head:])
    proc = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={work / 'profile'}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=timeout)
    found = re.search(r'<pre id="kc-check">(.*?)</pre>', proc.stdout, re.S)
    if not found:
        raise AssertionError(f"the page did not finish loading in Chromium (exit {proc.returncode}): "
                             f"{proc.stderr[-2000:]}")
    res = json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                     .replace("&amp;", "&"))
    res["console"] = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return res
