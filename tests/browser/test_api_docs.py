"""`/api/v1/docs` works with no internet: django-ninja's own Swagger UI files, no CDN."""

import json
import urllib.request


def test_api_docs_render_their_operations_offline(new_page, portal, screenshot):
    with urllib.request.urlopen(f"{portal.url}/api/v1/openapi.json", timeout=10) as response:  # noqa: S310
        schema = json.load(response)
    operations = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}

    page = new_page()
    page.goto("/api/v1/docs")
    page.locator(".opblock").first.wait_for()
    builds = page.locator(".opblock-post", has=page.locator('.opblock-summary-path[data-path="/api/v1/builds"]'))
    assert builds.locator(".opblock-summary-method").inner_text() == "POST"
    shown = {
        (block.locator(".opblock-summary-method").inner_text(),
         block.locator(".opblock-summary-path").get_attribute("data-path"))
        for block in page.locator(".opblock").all()
    }
    assert shown == operations
    assert page.offline.blocked == []  # it asked nothing of the internet
    screenshot(page, "api-docs")
