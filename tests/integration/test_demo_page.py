"""The demo page end to end in headless Chromium (Debian's chromium, driven by Playwright)."""

import shutil

import pytest
from PIL import Image

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (`make setup` installs Debian's chromium)")
def test_upload_shows_caption_beams_and_attention(live_gateway, test_images, tmp_path):
    from playwright.sync_api import sync_playwright

    image = tmp_path / "upload.jpg"
    Image.open(test_images[1]).convert("RGB").resize((300, 200)).save(image)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(live_gateway + "/", wait_until="load")  # a browser asks for text/html: the demo
            # What is served shows before any caption.
            page.wait_for_function("document.getElementById('model').textContent.includes('v1')", timeout=10_000)
            assert "patches" in page.text_content("#model")
            assert page.locator("#preview").is_hidden()
            page.set_input_files("#file", str(image))
            # The chosen image shows before it is captioned.
            page.wait_for_function("document.getElementById('preview').naturalWidth === 300", timeout=10_000)
            assert page.locator("#preview").is_visible()
            page.fill("#beam_size", "2")
            page.click("#submit")
            page.wait_for_selector("#result:not([hidden])", timeout=30_000)
            caption = page.text_content("#caption")
            assert caption and caption.strip()
            assert page.locator("#beams tbody tr").count() == 2
            words = page.locator("#words figure")
            assert words.count() == len(caption.split())
            assert page.locator("#words canvas").first.evaluate("c => c.width") == 128
            assert page.text_content("#error") == ""
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            page.set_input_files("#file", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"})
            page.click("#submit")
            page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=10_000)
            assert page.text_content("#error").startswith("415")
            # The error replaces the previous result; it is not shown under a stale caption.
            assert page.locator("#result").is_hidden() and page.text_content("#caption") == ""
            assert page.locator("#beams tbody tr").count() == 0

            page.click("a[href=docs]")
            page.wait_for_selector("section#predict", timeout=10_000)
            assert "multipart/form-data" in page.text_content("section#predict")
            assert page.text_content("#error") == ""
        finally:
            browser.close()
    assert (tmp_path / "demo.png").stat().st_size > 5000

