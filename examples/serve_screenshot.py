"""The README's picture of the live page: `npr serve` on a model, one question, a full-page screenshot.

    python examples/serve_screenshot.py --model runs/demo/stage2 --task countdown \\
        --question "use 3 5 4 to make 23" --seed 1 --out docs/serve.png

Needs Chromium (tools/install_browser.sh) and Playwright (in the dev extras).
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from urllib.parse import quote


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", default="countdown")
    ap.add_argument("--question", default="use 3 5 4 to make 23")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--out", default="docs/serve.png")
    args = ap.parse_args()

    import uvicorn
    from playwright.sync_api import sync_playwright

    from npr.progress import quiet_libraries
    from npr.serve import ServeConfig, build

    quiet_libraries()
    app, _ = build(args.model, ServeConfig("npr", task=args.task, max_tokens=512))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"http://127.0.0.1:{args.port}/?q={quote(args.question)}&seed={args.seed}")
        page.wait_for_selector("body[data-done='1']", timeout=300_000)
        page.screenshot(path=args.out, full_page=True)
        print(page.locator("#answer").inner_text(), "|", page.locator("#stats").inner_text().replace("\n", "  "))
        browser.close()
    server.should_exit = True
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
