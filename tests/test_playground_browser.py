"""The playground in a real browser: Playwright drives Debian's headless Chromium (scripts/install_system_deps.sh)
against reverie's HTTP app serving the shipped shapes model on a free port.

Each test saves a screenshot under artifacts/playground/ and fails if the page logged a console error, threw,
or fetched anything from another origin (the page must work offline)."""

import base64
import io
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from reverie.cli import model_path
from reverie.models.controlnet import ControlNet
from reverie.pipeline import Pipeline
from reverie.server.app import create_app
from reverie.server.engine import Engine
from reverie.server.schemas import Limits

CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright's own browser download needs the internet
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "playground"
MAX_PROMPT = 80  # the test server's prompt limit, so one test can provoke a server-side 422
TIMEOUT_MS = 60_000  # generous: the machine may be busy with other work
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app over an engine with the shipped model, a ControlNet copied from its UNet, and previews at
    every step; served by uvicorn in a thread."""
    import uvicorn

    pipe = Pipeline.from_pretrained(model_path("shapes"))
    controlnet = ControlNet.from_unet(pipe.unet, downsample_factor=pipe.downsample_factor)
    engine = Engine({"shapes": pipe}, tmp_path_factory.mktemp("jobs"), preview_interval_s=0.0,
                    controlnets={"scribble": controlnet}).start()
    assert engine.wait_ready(120), engine.load_error
    app = create_app(engine, limits=Limits(max_prompt_chars=MAX_PROMPT))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    uv.should_exit = True
    thread.join(10)
    engine.close(grace_s=5)


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), "run scripts/install_system_deps.sh (installs Debian's chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


class Watched:
    """A page plus what it logged: console errors, uncaught exceptions, requests to other origins."""

    def __init__(self, page, base):
        self.page, self.base = page, base
        self.errors, self.foreign, self.jobs = [], [], []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("request", self._request)

    def _request(self, request):
        if not request.url.startswith((self.base + "/", "data:")):
            self.foreign.append(request.url)
        if request.method == "POST" and request.url == self.base + "/v1/jobs":
            self.jobs.append(request.post_data_json)


@pytest.fixture
def watched(browser, server, request):
    base, _ = server
    context = browser.new_context(viewport={"width": 1366, "height": 768})  # a laptop screen
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    w = Watched(page, base)
    page.goto(base + "/")
    page.wait_for_selector("body[data-ready=true]")
    yield w
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    expected = getattr(request.node, "expected_console_errors", ())
    unexpected = [e for e in w.errors if not any(re.search(p, e) for p in expected)]
    assert not unexpected, f"console errors: {unexpected}"
    assert not w.foreign, f"requests to other origins: {w.foreign}"


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def image_src(page, selector: str) -> str:
    return page.eval_on_selector(selector, "img => img.getAttribute('src')")


def record_srcs(page, selector: str) -> None:
    """Record every src an <img> takes from now on, in page.__srcs[selector]."""
    page.evaluate("""sel => {
        window.__srcs = window.__srcs || {};
        const img = document.querySelector(sel), seen = window.__srcs[sel] = [];
        new MutationObserver(() => seen.push(img.getAttribute('src'))).observe(img, {attributes: true, attributeFilter: ['src']});
    }""", selector)


def recorded(page, selector: str) -> list:
    return page.evaluate("sel => window.__srcs[sel]", selector)


def test_forward_slider_changes_the_noisy_image(watched):
    page = watched.page
    expect(page.locator("#server-status")).to_contain_text("Connected. Model: shapes")
    expect(page.locator("#fwd-t")).to_have_text("500")
    before = image_src(page, "#fwd-xt")
    snr_before = page.inner_text("#fwd-snr")
    page.focus("#fwd-slider")  # the keyboard moves the slider
    page.keyboard.press("End")
    expect(page.locator("#fwd-t")).to_have_text("999")
    after = image_src(page, "#fwd-xt")
    assert after != before and after.startswith("data:image/png;base64,")
    assert page.inner_text("#fwd-snr") != snr_before
    # the x_t image is noisier at t = 999 than at t = 500 (further from the clean picture)
    x0 = decode_png(image_src(page, "#fwd-x0").split(",")[1]).astype(float)
    far = np.abs(decode_png(after.split(",")[1]) - x0).mean()
    near = np.abs(decode_png(before.split(",")[1]) - x0).mean()
    assert far > near
    # the curves mark the current t, and the sampler plot draws one line per ticked sampler
    ticked = page.locator("#sig-samplers input:checked").count()
    assert ticked >= 1 and page.locator("#plot-sigmas polyline").count() == ticked
    assert page.locator("#plot-alphabar polyline").count() == 3
    # another picture, another schedule, the sigma axis
    page.click("#fwd-samples button >> nth=2")
    expect(page.locator("#fwd-samples button >> nth=2")).to_have_attribute("aria-pressed", "true")
    page.select_option("#fwd-schedule", "cosine")
    expect(page.locator("#fwd-alphabar")).not_to_have_text(re.compile(r"^0\.004"))
    page.check('input[name="fwd-axis"][value="sigma"]')
    expect(page.locator("#fwd-slider-label")).to_contain_text("σ =")
    page.focus("#fwd-slider")
    page.keyboard.press("End")  # the cosine schedule's largest sigma (about 2e4)
    expect(page.locator("#fwd-sigma")).to_have_text(re.compile(r"^2\.0\d\de\+4$"))
    assert page.is_hidden("#error")


def test_generation_streams_step_previews_then_the_final_image(watched, server):
    page, steps = watched.page, 8
    page.click("#tab-reverse")
    page.fill("#rev-steps", str(steps))
    record_srcs(page, "#rev-x0")
    record_srcs(page, "#rev-x")
    page.click("#rev-run")
    expect(page.locator("#rev-final")).to_have_attribute("src", re.compile(r"^/v1/jobs/[0-9a-f]{32}/images/0\.png$"))
    expect(page.locator("#rev-status")).to_contain_text("Done")
    # previews arrive while it runs: a predicted x0 and an x_t per step, each different (the event stream
    # replays only the latest progress to a late subscriber, so the first steps may be missed)
    previews = [s for s in recorded(page, "#rev-x0") if s.startswith("data:image/png")]
    assert len(previews) >= 2 and len(set(previews)) == len(previews)
    assert len([s for s in recorded(page, "#rev-x") if s.startswith("data:image/png")]) == len(previews)
    assert page.get_attribute("#rev-scrub", "max") == str(len(previews))
    assert watched.jobs[-1]["preview"] is True and watched.jobs[-1]["steps"] == steps
    # the final image is served and decodes
    final = page.evaluate("""async () => {
        const r = await fetch(document.querySelector('#rev-final').getAttribute('src'));
        return [r.status, r.headers.get('content-type')];
    }""")
    assert final == [200, "image/png"]
    expect(page.locator("#rev-scrub-label")).to_contain_text(f"Step {steps} of {steps}")
    # scrub back to the first preview with the keyboard, then forward one
    page.focus("#rev-scrub")
    page.keyboard.press("Home")
    first = int(re.search(r"Step (\d+) of", page.inner_text("#rev-scrub-label"))[1])
    assert first < steps and image_src(page, "#rev-x0") == previews[0]
    page.keyboard.press("ArrowRight")
    assert int(re.search(r"Step (\d+) of", page.inner_text("#rev-scrub-label"))[1]) > first
    assert image_src(page, "#rev-x0") == previews[1]
    assert page.is_hidden("#error")


def test_a_running_generation_can_be_cancelled(watched, server):
    page, (base, engine) = watched.page, server
    page.click("#tab-reverse")
    page.fill("#rev-steps", "100")
    page.select_option("#rev-sampler", "Heun")  # two network calls a step: a long run
    page.click("#rev-run")
    expect(page.locator("#rev-status")).to_contain_text("Step")  # it is running
    page.click("#rev-cancel")
    expect(page.locator("#rev-status")).to_have_text("Cancelled.")
    expect(page.locator("#rev-cancel")).to_be_disabled()
    expect(page.locator("#rev-run")).to_be_enabled()
    assert page.is_hidden("#error")  # a cancel is not an error
    assert not image_src(page, "#rev-final").startswith("/v1/jobs/")
    job_id = page.get_attribute("body", "data-last-job")
    assert engine.get(job_id).status == "cancelled"
    status = page.evaluate("async url => (await (await fetch(url)).json()).status", f"{base}/v1/jobs/{job_id}")
    assert status == "cancelled"
    step = int(re.search(r"Step (\d+)", page.inner_text("#rev-scrub-label"))[1])
    assert 1 <= step < 100  # stopped part-way


def test_paint_a_mask_and_inpaint(watched):
    page = watched.page
    page.click("#tab-edit")
    page.check('input[name="edit-mode"][value="inpaint"]')
    page.fill("#edit-steps", "6")
    # paint the left half with the mouse, and one dab with the keyboard
    box = page.locator("#edit-paint").bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + 20)
    page.mouse.down()
    for y in range(20, int(box["height"]) - 10, 12):
        page.mouse.move(box["x"] + 20, box["y"] + y, steps=3)
        page.mouse.move(box["x"] + box["width"] / 2 - 20, box["y"] + y, steps=3)
    page.mouse.up()
    page.focus("#edit-paint")
    for _ in range(8):
        page.keyboard.press("ArrowRight")
    page.keyboard.press("Space")
    page.click("#edit-run")
    expect(page.locator("#edit-result")).to_have_attribute("src", re.compile(r"^/v1/jobs/"))
    expect(page.locator("#edit-status")).to_contain_text("Done")
    body = watched.jobs[-1]
    assert body["strength"] == 1 and body["steps"] == 6
    mask, source = decode_png(body["mask"]), decode_png(body["image"])
    assert mask.shape == source.shape == (64, 64, 3)
    assert set(np.unique(mask)) == {0, 255}  # black and white
    left, right = mask[:, :28].mean() / 255, mask[:, 40:].mean() / 255
    assert left > 0.6 and right < 0.05
    assert mask[31:34, 46:51].min() == 255  # the keyboard's dab: 8 presses move the brush 16 px right of (32, 32)
    # the unpainted region of the result is the source picture (inpainting keeps what is not masked)
    result = page.evaluate("""async () => {
        const img = document.querySelector('#edit-result');
        const c = Object.assign(document.createElement('canvas'), {width: 64, height: 64});
        c.getContext('2d').drawImage(img, 0, 0, 64, 64);
        return c.toDataURL('image/png').split(',')[1];
    }""")
    result = decode_png(result).astype(float)
    keep = mask[..., 0] == 0
    kept = np.abs(result[keep] - source[keep]).mean()
    repainted = np.abs(result[~keep] - source[~keep]).mean()
    assert kept < repainted


def test_controlnet_with_a_drawn_control_image(watched):
    page = watched.page
    page.click("#tab-edit")
    page.check('input[name="edit-mode"][value="controlnet"]')
    expect(page.locator("#edit-control-type")).to_have_value("scribble")
    page.fill("#edit-steps", "4")
    page.click("#edit-center")  # a centred white square, drawn with one keyboard-reachable button
    page.click("#edit-run")
    expect(page.locator("#edit-result")).to_have_attribute("src", re.compile(r"^/v1/jobs/"))
    body = watched.jobs[-1]
    control = decode_png(body["control_image"])
    assert body["control_type"] == "scribble" and "image" not in body
    assert control[32, 32].tolist() == [255, 255, 255] and control[2, 2].tolist() == [0, 0, 0]


def test_guidance_explorer_and_sampler_timings(watched):
    page = watched.page
    page.click("#tab-guidance")
    page.fill("#gui-steps", "2")
    page.click("#gui-run")
    expect(page.locator("#gui-status")).to_have_text("Done: 5 images.")
    assert [j["guidance_scale"] for j in watched.jobs] == [1, 4, 7.5, 12, 20]
    assert len({j["seed"] for j in watched.jobs}) == 1 and len({j["prompt"] for j in watched.jobs}) == 1
    assert page.locator("#gui-results img[src^='/v1/jobs/']").count() == 5
    # samplers: tick exactly two, run, each card shows its time
    for box in page.locator("#cmp-samplers input").all():
        box.set_checked(box.get_attribute("value") in ("Euler", "DPM++ 2M Karras"))
    page.fill("#cmp-steps", "3")
    page.click("#cmp-run")
    expect(page.locator("#cmp-status")).to_have_text("Done: 2 images.")
    assert [j["sampler"] for j in watched.jobs[5:]] == ["Euler", "DPM++ 2M Karras"]
    assert all(j["preview"] is False for j in watched.jobs[5:])  # previews would add to the timings
    notes = page.locator("#cmp-results figcaption span").all_inner_texts()
    assert len(notes) == 2 and all(re.fullmatch(r"\d+\.\d\d s", n) for n in notes)


def test_server_errors_are_shown_in_plain_words(watched, request):
    request.node.expected_console_errors = [r"Failed to load resource: .* 422"]  # the browser logs the 422 itself
    page = watched.page
    page.click("#tab-reverse")
    page.fill("#rev-prompt", "a red circle " * 10)  # over the test server's prompt limit
    page.click("#rev-run")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-text")).to_have_text(
        re.compile(rf"^Please check the settings: prompt: must be at most {MAX_PROMPT} characters"))
    expect(page.locator("#rev-run")).to_be_enabled()
    page.click("#error-close")
    expect(page.locator("#error")).to_be_hidden()


def test_sections_are_reachable_by_keyboard(watched):
    page = watched.page
    page.focus("#tab-forward")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#panel-reverse")).to_be_visible()
    expect(page.locator("#panel-forward")).to_be_hidden()
    assert page.evaluate("document.activeElement.id") == "tab-reverse"
    page.keyboard.press("End")
    expect(page.locator("#panel-edit")).to_be_visible()
    page.keyboard.press("Tab")  # from the tab list into the section
    assert page.evaluate("document.activeElement.closest('[role=tabpanel]')?.id") == "panel-edit"
    # every control has an accessible name
    unnamed = page.evaluate("""() => [...document.querySelectorAll('input, select, button, canvas[tabindex]')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim()
                     && !e.closest('label'))
        .map(e => e.id || e.outerHTML.slice(0, 60))""")
    assert unnamed == []
