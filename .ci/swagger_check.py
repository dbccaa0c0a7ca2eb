"""Drive Swagger UI in headless Chromium like a person: POST /infer with a PNG, see a 200 with a description.

    python .ci/swagger_check.py BASE_URL PNG_PATH SCREENSHOT_PATH
"""

from __future__ import annotations

import sys

from playwright.sync_api import expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync", "--disable-quic"]


def main(base: str, png: str, screenshot: str) -> int:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(f"{base}/docs", wait_until="networkidle")
        block = page.locator("#operations-inference-infer_diagram")
        block.locator(".opblock-summary").click()
        block.get_by_role("button", name="Try it out").click()
        block.locator('input[type="file"]').set_input_files(png)
        block.get_by_role("button", name="Execute").click()
        status = block.locator(".live-responses-table .response .response-col_status").first
        expect(status).to_have_text("200", timeout=120_000)
        body = block.locator(".live-responses-table .response .microlight, "
                             ".live-responses-table .response pre").first
        expect(body).to_contain_text('"description"', timeout=10_000)
        expect(body).to_contain_text('"finish_reason"', timeout=10_000)
        block.locator(".live-responses-table").scroll_into_view_if_needed()
        page.screenshot(path=screenshot, full_page=True)
        browser.close()
    print(f"swagger: POST /infer via the UI returned 200 with a description; screenshot {screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
