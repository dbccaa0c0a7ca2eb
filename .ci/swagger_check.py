"""Drive Swagger UI in headless Chromium like a person: POST /infer with a PNG, see a 200 with a description.
With an API key: Execute first gets 401, then Authorize with the key, Execute again, see the 200.

    python .ci/swagger_check.py BASE_URL PNG_PATH SCREENSHOT_PATH [API_KEY]
"""

from __future__ import annotations

import sys

from playwright.sync_api import expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync", "--disable-quic"]


def authorize(page, api_key: str) -> None:
    """Swagger UI's Authorize button, the X-API-Key scheme's field, Authorize, Close."""
    page.locator(".auth-wrapper .authorize").first.click()
    scheme = page.locator(".auth-container").filter(has_text="apiKeyHeader")
    scheme.locator("input").fill(api_key)
    scheme.locator("button.authorize").click()  # its accessible name is "Apply credentials"
    page.locator(".modal-ux button.btn-done").first.click()


def main(base: str, png: str, screenshot: str, api_key: str | None = None) -> int:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(f"{base}/docs", wait_until="networkidle")
        block = page.locator("#operations-inference-infer_diagram")
        block.locator(".opblock-summary").click()
        block.get_by_role("button", name="Try it out").click()
        block.locator('input[type="file"]').set_input_files(png)
        status = block.locator(".live-responses-table .response .response-col_status").first
        if api_key:
            block.get_by_role("button", name="Execute").click()
            expect(status).to_have_text("401", timeout=60_000)
            authorize(page, api_key)
        block.get_by_role("button", name="Execute").click()
        expect(status).to_have_text("200", timeout=120_000)
        body = block.locator(".live-responses-table .response .microlight, "
                             ".live-responses-table .response pre").first
        expect(body).to_contain_text('"description"', timeout=10_000)
        expect(body).to_contain_text('"finish_reason"', timeout=10_000)
        block.locator(".live-responses-table").scroll_into_view_if_needed()
        page.screenshot(path=screenshot, full_page=True)
        browser.close()
    how = "after Authorize with the API key (401 before)" if api_key else "via the UI"
    print(f"swagger: POST /infer {how} returned 200 with a description; screenshot {screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
