"""A real browser (Debian's chromium, driven by Playwright) uses the tiny app: upload, prompt, compare, Generate.

Needs `apt-get install chromium chromium-driver`; Playwright's own browser download is not used. Deselect with
`-m "not browser"` where no chromium can be installed.
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from apphelpers import REPO, start_app, stop_app

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
VIDEOS_READY = """() => {
    const videos = [...document.querySelectorAll('#stock-video video, #video video')];
    return videos.length === 2 && videos.every(v => v.readyState >= 2);
}"""


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    running = start_app(tmp_path_factory.mktemp("browser"))
    yield running
    stop_app(running)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def test_compare_in_the_browser(app, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(app.url, wait_until="domcontentloaded")
    page.locator("#generate").wait_for(timeout=60_000)
    assert "Test model" in page.locator("#test-model-banner").inner_text()

    page.locator("#image input[type=file]").set_input_files(str(REPO / "assets" / "rocket.jpg"))
    page.locator("#image img").first.wait_for(timeout=30_000)  # the upload finished and shows a preview
    page.locator("#prompt textarea").fill("a rocket lifting off")
    steps = page.locator("#steps input[type=number]")
    steps.fill("7")
    steps.press("Enter")
    page.locator("#compare input[type=checkbox]").check()
    page.locator("#generate").click()

    page.wait_for_function(VIDEOS_READY, timeout=180_000)
    report = page.locator("#report textarea")
    assert report.is_visible()
    text = report.input_value()
    assert text.startswith("stock: NaN from step 1 of 7 (t=999): video is black"), text
    assert "fixed: finite" in text
    # each video has its own line, with its time, right under it
    assert page.locator("#stock-note").inner_text().startswith("stock: NaN from step 1 of 7 (t=999)")
    assert page.locator("#video-note").inner_text().startswith("fixed: finite (")
    # Both play: muted (autoplay policy), started by the page, and their clocks move.
    played = page.evaluate("""async () => {
        const videos = [...document.querySelectorAll('#stock-video video, #video video')];
        for (const v of videos) { v.muted = true; await v.play(); }
        await new Promise(r => setTimeout(r, 700));
        return videos.map(v => v.currentTime > 0 && !v.paused);
    }""")
    assert played == [True, True]

    shot = tmp_path / "compare.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    docs = REPO / "docs"
    docs.mkdir(exist_ok=True)
    shutil.copyfile(shot, docs / "compare.png")  # the README's picture
    assert errors == []
    page.close()


def test_cancel_in_the_browser(app, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app.url, wait_until="domcontentloaded")
    page.locator("#generate").wait_for(timeout=60_000)
    page.locator("#image input[type=file]").set_input_files(str(REPO / "assets" / "chelsea.jpg"))
    page.locator("#image img").first.wait_for(timeout=30_000)
    steps = page.locator("#steps input[type=number]")
    steps.fill("100")
    steps.press("Enter")
    log_before = len(app.log())
    page.locator("#generate").click()
    # gr.Progress shows "fixed sampler: step k of 100" on the output while it runs
    page.get_by_text("fixed sampler: step").first.wait_for(timeout=120_000)
    # ... on the video panes only: the small boxes (seed, settings file, report, notes) draw no overlay.
    assert page.get_by_text("fixed sampler: step").first.evaluate("e => !!e.closest('#video, #stock-video')")
    for box in ("#seed-used", "#settings", "#report", "#video-note"):
        assert page.locator(f"{box} [data-testid=status-tracker]:not(.hide)").count() == 0, box
    page.locator("#cancel").click()
    page.wait_for_function("() => document.querySelector('#report textarea').value === 'cancelled'", timeout=30_000)
    deadline = time.monotonic() + 60
    while "cancelled at step" not in app.log()[log_before:] and time.monotonic() < deadline:
        time.sleep(0.2)
    stopped = re.search(r"fixed sampler: cancelled at step (\d+)", app.log()[log_before:])
    assert stopped and int(stopped.group(1)) < 100
    assert not [f for f in app.result_files() if ".partial" in f]
    page.close()


def _open(browser, app):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app.url, wait_until="domcontentloaded")
    page.locator("#generate").wait_for(timeout=60_000)
    return page


def _note_starts_with(page, text: str) -> None:
    page.wait_for_function("t => document.querySelector('#schedule-note').innerText.startsWith(t)", arg=text,
                           timeout=30_000)


# What upstream's sampler does at each example row's settings (reference README, section 4): 7 steps of
# uniform_trailing at eta 1 give a square-root argument of -5.96e-8 at t=999, 36 uniform steps index t=1000,
# and the defaults (50 trailing steps) are finite.
EXAMPLE_NOTES = [
    (0, "7", "stock: 1 - a_prev - sigma^2 = -5.96e-08 < 0 at step 1 (t=999)"),
    (2, "50", "stock: every step is finite"),
    (1, "36", "stock: crashes before the first step: uniform spacing cannot do 36 steps"),
    (3, "50", "stock: every step is finite"),
]


def test_example_rows_and_typing_move_the_schedule_plot(app, browser):
    page = _open(browser, app)
    _note_starts_with(page, "stock: every step is finite")  # the page's own defaults
    assert page.locator("#seed-used textarea").input_value() == ""  # no seed before any run
    steps = page.locator("#steps input[type=number]")
    for row, expected_steps, note in EXAMPLE_NOTES:
        page.locator(f"[data-testid=dataset-cell-{row}-1]").click()
        page.wait_for_function("n => document.querySelector('#steps input[type=number]').value === n",
                               arg=expected_steps, timeout=30_000)
        _note_starts_with(page, note)
    # Typing a number and pressing Enter redraws it too (the last row left 50 trailing steps, eta 1).
    steps.fill("7")
    steps.press("Enter")
    _note_starts_with(page, EXAMPLE_NOTES[0][2])
    page.close()


def test_a_long_video_in_the_browser(app, browser):
    # tiny: T = 4, so 12 frames is 9 overlapping windows; the line beside the slider says so before the run.
    page = _open(browser, app)
    page.locator("#image input[type=file]").set_input_files(str(REPO / "assets" / "coffee.jpg"))
    page.locator("#image img").first.wait_for(timeout=30_000)

    # Beside Generate: the memory estimate for the frames asked, against this machine's free RAM.
    def fits(n: int) -> str:
        return (f"() => /^Memory for {n} frames: needs about .* MiB; this machine has .*: fits\\.$/"
                ".test(document.querySelector('#memory').innerText.trim())")

    page.wait_for_function(fits(4), timeout=30_000)
    frames = page.locator("#frames input[type=number]")
    frames.fill("12")
    frames.press("Enter")
    page.wait_for_function("() => document.querySelector('#frames-cost').innerText.startsWith('12 frames: 9 overlapping')",
                           timeout=30_000)
    page.wait_for_function(fits(12), timeout=30_000)  # estimated again for the new length
    steps = page.locator("#steps input[type=number]")
    steps.fill("2")
    steps.press("Enter")
    page.locator("#generate").click()
    page.wait_for_function("() => { const v = document.querySelector('#video video'); return v && v.readyState >= 2; }",
                           timeout=180_000)
    duration = page.evaluate("() => document.querySelector('#video video').duration")
    assert abs(duration - 12 / 8) < 0.2  # 12 frames at the model's 8 fps
    assert "frames: 12 from 9 overlapping windows" in page.locator("#report textarea").input_value()
    page.close()


@pytest.fixture(scope="module")
def interp_app(tmp_path_factory):
    running = start_app(tmp_path_factory.mktemp("browser-interp"), model="tiny_interp")
    yield running
    stop_app(running)


def test_a_storyboard_in_the_browser(interp_app, browser):
    # tiny_interp opens on its interpolation tab. Four uploads, the order "1 2 4" drops the third: 3 keyframes,
    # (3 - 1)(4 - 1) + 1 = 7 frames at 8 fps.
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    page.goto(interp_app.url, wait_until="domcontentloaded")
    page.locator("#interpolate").wait_for(timeout=60_000)
    page.get_by_text("Storyboard: several keyframes").click()
    names = ["ball_up.png", "ball_down.png", "cat_sitting.png", "sun_low.png"]
    page.locator("#storyboard-keyframes input[type=file]").set_input_files([str(REPO / "assets" / n) for n in names])
    page.wait_for_function("() => document.querySelectorAll('#storyboard-keyframes tr').length >= 4", timeout=60_000)
    page.locator("#storyboard-order textarea, #storyboard-order input").first.fill("1 2 4")
    steps = page.locator("#interp-steps input[type=number]")
    steps.fill("1")
    steps.press("Enter")
    page.locator("#storyboard").click()
    page.wait_for_function(
        "() => { const v = document.querySelector('#interp-video video'); return v && v.readyState >= 2; }",
        timeout=180_000)
    duration = page.evaluate("() => document.querySelector('#interp-video video').duration")
    assert abs(duration - 7 / 8) < 0.15, duration
    assert page.locator("#interp-report textarea").input_value().startswith("fixed: finite")
    page.close()
