"""/docs in a real headless browser against the running API: Swagger UI renders every
operation from assets served by the API itself (no CDN), and shows the Authorize button."""

from __future__ import annotations

import pytest
from browserkit import open_page

pytestmark = pytest.mark.service


def test_swagger_ui_renders_offline_with_authorize(stack, tmp_path):
    seen = open_page(
        f"{stack.url}/docs",
        tmp_path / "docs.png",
        allowed=(stack.url, "data:", "about:", "blob:"),
        wait_for=".swagger-ui .opblock",
        probe=lambda page: {
            "operations": page.locator(".swagger-ui .opblock").count(),
            "authorize": page.locator("button.authorize").is_visible(),
            "locks": page.locator(".swagger-ui .opblock .authorization__btn").count(),
        },
    )
    assert seen["outside"] == [], seen["outside"]
    assert seen["errors"] == [], seen["errors"]
    assert seen["probe"]["operations"] >= 20 and seen["probe"]["authorize"]
    assert seen["probe"]["locks"] >= 15
    assert (tmp_path / "docs.png").stat().st_size > 10_000
