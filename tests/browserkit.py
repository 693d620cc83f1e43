"""A real headless browser for tests: the OS's Chromium (apt: `make browser`), driven by
Playwright for Python. Never `playwright install`: nothing is downloaded at run time."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = (
    os.environ.get("PRUNERY_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
)


def _playwright():  # type: ignore[no-untyped-def]
    if not Path(CHROMIUM).is_file():
        message = f"no Chromium at {CHROMIUM}: `make setup` installs it (apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    sync_api = pytest.importorskip("playwright.sync_api")
    return sync_api.sync_playwright()


def open_page(
    url: str,
    screenshot: Path,
    *,
    allowed: tuple[str, ...] = ("file:", "data:", "about:", "blob:"),
    wait_for: str | None = None,
    probe: Any = None,
) -> dict[str, Any]:
    """Load `url`; return console errors, requests to anything not in `allowed`, the visible
    size of every `svg.plot`, the page title and `probe(page)`; save a full-page screenshot."""
    errors: list[str] = []
    outside: list[str] = []
    with _playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--headless"]
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on(
                "request",
                lambda r: outside.append(r.url) if not r.url.startswith(allowed) else None,
            )
            page.goto(url, wait_until="load")
            if wait_for:
                page.wait_for_selector(wait_for, timeout=20_000)
            plots = {}
            for svg in page.locator("svg.plot").all():
                box = svg.bounding_box()
                plots[svg.get_attribute("data-plot")] = (
                    svg.is_visible(),
                    box["width"] if box else 0,
                    box["height"] if box else 0,
                )
            result = {
                "plots": plots,
                "marks": page.locator("svg.plot rect, svg.plot polyline").count(),
                "title": page.title(),
                "probe": probe(page) if probe else None,
            }
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    result.update(errors=errors, outside=outside)
    return result
