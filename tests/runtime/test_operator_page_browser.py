"""The operator page in a real browser: `llb-edge serve` as a process, frames with known defects
replayed into it, the page opened in headless Chromium (Debian's `chromium`, driven by Playwright).

Checks what an operator relies on: the latest frame appears, an NG frame is in the gallery and
opens full size, the counters match what was sent, and the page only ever GETs from its own
origin with no script error (its Content-Security-Policy forbids anything else). The screenshots
are saved in the test's tmp folder (printed); with LLB_EDGE_PAGE_SCREENSHOT=PATH the page's is
also written to PATH (how docs/operator-page.png was made).

scripts/test.sh installs chromium with apt-get when it is missing; the test skips, saying why,
only where that was not possible.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from runtime_harness import ANY_PORT, Client, daemon_process, flat_frame, square_frame

pytest_plugins = ["runtime_fixtures"]  # contract-test-model bundles
pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]  # a daemon process and a browser

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_ENV = "LLB_EDGE_PAGE_SCREENSHOT"
BOX = (60, 50, 40, 30)  # the known defect: a white square at x, y, w, h of a 240 x 320 frame


def _sync_playwright() -> Any:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/test.sh does when it can)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[dev]'")
    return sync_playwright


def test_operator_page_in_headless_chromium(bundle_dir: Path, tmp_path: Path) -> None:
    sync_playwright = _sync_playwright()
    args = [
        str(bundle_dir),
        *("--intake", ANY_PORT, "--results", ANY_PORT, "--control", "off"),
        *("--health-port", "0", "--heartbeat-s", "0.05", "--ort-threads", "1", "--queue-size", "32"),
    ]
    daemon = daemon_process(args, block_torch=True)  # as on a line PC: the page needs no torch either
    try:
        serving = daemon.wait_for("serving")
        base = serving["health"]
        sent = {"cam-a": 0, "cam-b": 0}
        with Client(serving["intake"], serving["results"]) as client:
            for frame_id in range(1, 9):  # cam-a: frames 3 and 6 carry the defect
                defect = frame_id in (3, 6)
                client.send_frame("cam-a", frame_id, square_frame(240, 320, BOX) if defect else flat_frame(240, 320))
                sent["cam-a"] += 1
            for frame_id in range(1, 4):
                client.send_frame("cam-b", frame_id, flat_frame(240, 320))
                sent["cam-b"] += 1
            client.send_frame("cam-b", 4, square_frame(240, 320, BOX), "jpeg")
            sent["cam-b"] += 1
            headers = client.headers(sum(sent.values()))
        assert {(h.camera_id, h.frame_id) for h in headers if h.decision == "NG"} == {
            ("cam-a", 3),
            ("cam-a", 6),
            ("cam-b", 4),
        }

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                requests: list[tuple[str, str]] = []
                problems: list[str] = []
                page.on("request", lambda request: requests.append((request.method, request.url)))
                page.on(
                    "response",
                    lambda response: problems.append(f"HTTP {response.status}: {response.url}")
                    if response.status >= 400
                    else None,
                )
                page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
                page.on(
                    "console",
                    lambda message: problems.append(f"console {message.type}: {message.text}")
                    if message.type in ("error", "warning")
                    else None,
                )
                page.goto(base + "/")

                # The latest frame of each camera, loaded (not just requested).
                live_a = page.locator('section.camera[data-camera="cam-a"] .live img[data-frame-id="8"]')
                live_a.wait_for(timeout=15_000)
                assert live_a.evaluate("img => img.complete && img.naturalWidth") == 320
                live_b = page.locator('section.camera[data-camera="cam-b"] .live img[data-frame-id="4"]')
                live_b.wait_for(timeout=15_000)
                card_b = page.locator('section.camera[data-camera="cam-b"]')
                assert card_b.locator(".decision").inner_text() == "NG"

                # The NG frames in cam-a's gallery, newest first, with their thumbnails loaded.
                gallery = page.locator('section.camera[data-camera="cam-a"] .gallery .ng-item')
                gallery.nth(1).wait_for(timeout=15_000)
                assert [item.get_attribute("data-frame-id") for item in gallery.all()] == ["6", "3"]
                page.wait_for_function(
                    "() => [...document.querySelectorAll('.gallery img')].every(i => i.complete && i.naturalWidth)"
                )
                assert "#3" in gallery.nth(1).inner_text()

                # The counters.
                total = sum(sent.values())
                page.wait_for_function(f"() => document.getElementById('total-frames').textContent === '{total}'")
                assert page.locator("#model").inner_text() == "contract-test-model v1"
                assert page.locator("#backend").inner_text() == "ort-cpu"
                assert page.locator("#total-drops").inner_text() == "0"
                assert page.locator("#total-errors").inner_text() == "0"
                assert page.locator("#link").inner_text() == "serving"
                assert "no expected false-reject rate" in page.locator("#expected").inner_text()
                assert page.locator('section.camera[data-camera="cam-a"] .facts').inner_text().count("8 / 2") == 1

                shot = tmp_path / "operator-page.png"
                page.screenshot(path=str(shot), full_page=True)
                print(f"operator page screenshot: {shot}")
                if os.environ.get(SCREENSHOT_ENV):
                    shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])

                # Click an NG frame: the full-size frame and its map open.
                gallery.nth(1).click()
                page.locator("#detail[open]").wait_for(timeout=5_000)
                page.wait_for_function(
                    "() => ['detail-image', 'detail-overlay'].every(id => { const i = document.getElementById(id);"
                    " return i.complete && i.naturalWidth === 320; })"
                )
                assert "frame 3" in page.locator("#detail-caption").inner_text()
                page.screenshot(path=str(tmp_path / "operator-page-detail.png"))
            finally:
                browser.close()

        assert problems == []
        assert requests and all(method == "GET" and url.startswith(base + "/") for method, url in requests)
        assert any("/page/state.json" in url for _, url in requests)
    finally:
        daemon.stop()
