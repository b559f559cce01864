"""Manual check of the chat page in real headless Chromium (not collected by pytest).

Needs Debian's `chromium` (`apt-get install -y chromium`) and `pip install playwright` (it
drives the system browser; no browser download). Starts a server on a free loopback port over
a checkpoint, types a message, waits for the streamed reply, checks that Stop cancels a long
reply (the engine has no sequence left), and writes a screenshot.

usage: python tests/serve/browser_check.py CHECKPOINT [--screenshot chat.png]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from geode.serve.app import create_app  # noqa: E402
from tests.serve.helpers import LiveServer, wait_until  # noqa: E402


def main() -> int:
    """Run the check; exit code 0 on success."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--screenshot", default="chat.png")
    ap.add_argument("--browser", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    live = LiveServer(create_app(args.checkpoint, model_name="tiny")).start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.browser, headless=True)
            page = browser.new_page()
            page.goto(live.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
            page.fill("#max_tokens", "24")
            page.fill("#input", "hello there")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.user")
            # the reply streams in: wait for text, then for the Send button to come back
            page.wait_for_function(
                "document.querySelector('.msg.assistant .body').textContent.length > 0",
                timeout=30_000,
            )
            page.wait_for_function("!document.getElementById('send').disabled", timeout=30_000)
            reply = page.inner_text(".msg.assistant .body")
            stats = page.inner_text("#stats")
            print(f"reply: {reply!r}\nstats: {stats}")
            page.screenshot(path=args.screenshot, full_page=True)
            # Stop: a long reply is cancelled in the page and on the server
            page.fill("#max_tokens", "300")
            page.fill("#input", "tell me a long story")
            page.press("#input", "Enter")
            page.wait_for_function("!document.getElementById('stop').disabled")
            time.sleep(0.5)
            page.click("#stop")
            page.wait_for_function(
                "document.querySelectorAll('.msg.assistant')[1].textContent.includes('[stopped]')"
            )
            state = live.state
            idle = wait_until(
                lambda: not state.engine.has_unfinished() and state.scheduler.num_running == 0
            )
            print(f"stopped; engine idle after stop: {idle}")
            n_msgs = page.evaluate("document.querySelectorAll('.msg').length")
            print(f"messages on the page: {n_msgs}; screenshot: {args.screenshot}")
            browser.close()
            return 0 if (reply and idle and n_msgs == 4) else 1
    finally:
        live.stop()


if __name__ == "__main__":
    sys.exit(main())
