"""The live tree page in a real headless browser (Chromium from Debian, driven by Playwright).

`make test` installs Chromium where it can (tools/install_browser.sh); elsewhere the test is
skipped with the reason. The screenshot goes to $NPR_SCREENSHOT or the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import bias_tags, make_model, make_tokenizer
from test_serve import NAME, Server

from npr.engine import LLM
from npr.serve import EngineLoop, ServeConfig, create_app
from npr.tokens import add_npr_tokens

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
BROWSER = os.environ.get("NPR_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(BROWSER is None, reason="no Chromium found (tools/install_browser.sh installs Debian's)")
def test_page_streams_a_question_into_step_columns(tmp_path):
    import openai

    tok = make_tokenizer()
    add_npr_tokens(tok)
    model = bias_tags(make_model("qwen3", len(tok)), tok, 4.0)
    engine = EngineLoop(LLM(model, tok, num_pages=1024, page_size=4))
    server = Server(create_app(engine, ServeConfig(NAME, max_tokens=256)))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        question = "the plan is"
        for seed in range(10):  # the request the page sends: a seed whose answer forks in its first block
            r = client.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": question}], max_tokens=256, seed=seed,
                extra_body={"mode": "parallel"},
            )  # fmt: skip
            blocks = r.choices[0].model_extra["npr"]["blocks"]
            if blocks and len(blocks[0]["steps"]) >= 2:
                break
        else:
            pytest.fail("no seed in 10 gives a parallel first block")
        shot = Path(os.environ.get("NPR_SCREENSHOT") or tmp_path / "page.png")
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{server.url}/?q={quote(question)}&seed={seed}")
            page.wait_for_selector("body[data-done='1']", timeout=120_000)
            columns = page.locator(".block").first.locator(".step")
            assert columns.count() == len(blocks[0]["steps"]) >= 2
            texts = [columns.nth(i).locator("span").inner_text() for i in range(columns.count())]
            assert [t.strip() for t in texts] == [s.strip() for s in blocks[0]["steps"]]
            assert "critical path" in page.locator("#stats").inner_text()
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert shot.stat().st_size > 10_000
    finally:
        server.stop()
