"""The page of ``pbe serve`` in a real browser: Playwright drives Debian's chromium against the real server
(``pbe.serve.create_app`` under uvicorn) around a real pipeline on the tiny stand-in, wrapped to record what it gets.

A person's actions only: pictures chosen with the file inputs (or pasted, dropped), the mask drawn with the mouse,
Paint clicked. The checks look at what the SERVER received (the mask, pixel by pixel, against the stroke's geometry
mapped to image pixels) and at what the page shows. chromium missing is a failure that names the setup script:
this test runs in CI, never skipped.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
from serving import running

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EXAMPLES = Path(__file__).resolve().parent.parent / "pbe" / "examples"
VIEWPORT = {"width": 1366, "height": 768}  # a laptop screen: the picture is shown smaller than its pixels
PICTURE_SIZE = (640, 448)  # (width, height): not square, larger than the canvas on screen
TOKEN = "s3cret-token"


@dataclass
class Call:
    """One painting the server asked for: the mask it passed (0..255, the picture's size) and how it ended."""

    mask: np.ndarray
    steps: int
    steps_run: int = 0
    outcome: str = "running"  # then "done" or the name of the exception that stopped it


@dataclass
class RecordingPipe:
    """A PaintByExample wrapper that records each call's mask, its steps run and how it ended."""

    pipe: Any
    calls: list[Call] = field(default_factory=list)

    @property
    def scheduler_config(self) -> Any:
        return self.pipe.scheduler_config

    def __call__(self, example_image: Any, image: Any, mask_image: Any, *, callback: Callable[..., None] | None = None,
                 **keywords: Any) -> Any:
        call = Call(np.array(mask_image.convert("L")), keywords["options"].steps)
        self.calls.append(call)

        def counted(*args: Any) -> None:
            call.steps_run += 1
            if callback is not None:
                callback(*args)

        try:
            result = self.pipe(example_image, image, mask_image, callback=counted, **keywords)
        except BaseException as err:
            call.outcome = type(err).__name__
            raise
        call.outcome = "done"
        return result


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: the browser test needs Debian's chromium; run `bash "
                    f"scripts/setup_and_test.sh` (it installs it) or `apt-get install -y chromium`")
    return CHROMIUM


@pytest.fixture(scope="module")
def recording(hub: Path, one_thread: None) -> RecordingPipe:
    from pbe import PaintByExample

    return RecordingPipe(PaintByExample.from_pretrained(hub))


@pytest.fixture(scope="module")
def server(recording: RecordingPipe) -> Iterator[str]:
    from pbe.serve import create_app

    with running(create_app(recording)) as url:
        yield url


@pytest.fixture(scope="module")
def token_server(recording: RecordingPipe) -> Iterator[str]:
    from pbe.serve import create_app

    with running(create_app(recording, token=TOKEN)) as url:
        yield url


@pytest.fixture(scope="module")
def browser(chromium: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium-profile"), executable_path=str(chromium), headless=True,
            args=CHROMIUM_ARGS, viewport=VIEWPORT)
        context.set_default_timeout(20_000)
        yield context
        context.close()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The picture (the example scene stretched to PICTURE_SIZE) and the example, as files a person would choose."""
    folder = tmp_path_factory.mktemp("pictures")
    picture = folder / "scene.png"
    PIL.Image.open(EXAMPLES / "image.png").convert("RGB").resize(PICTURE_SIZE).save(picture)
    return picture, EXAMPLES / "example.png"


@pytest.fixture()
def open_page(browser: Any) -> Iterator[Callable[..., Any]]:
    """Open the page at a URL; JavaScript errors on it fail the test."""
    pages, errors = [], []

    def open_(url: str) -> Any:
        page = browser.new_page()
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]")
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


# ---- what a person does ---------------------------------------------------------------------------------------------


def load(page: Any, pictures: tuple[Path, Path]) -> None:
    page.set_input_files("#picture-file", str(pictures[0]))
    page.set_input_files("#example-file", str(pictures[1]))
    page.wait_for_selector("#canvas-box:not([hidden])")
    page.wait_for_selector("#example-preview:not([hidden])")


@dataclass(frozen=True)
class Stroke:
    """A straight stroke in image pixels: from ``start`` to ``end`` with a brush of ``radius``."""

    start: tuple[float, float]
    end: tuple[float, float]
    radius: float

    def distance(self, shape: tuple[int, int]) -> np.ndarray:
        """Each pixel centre's distance to the stroke's segment, an array of ``shape`` (height, width)."""
        y, x = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
        (x0, y0), (x1, y1) = self.start, self.end
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0, 1)
        return np.hypot(x - (x0 + t * dx), y - (y0 + t * dy))


def draw(page: Any, start: tuple[float, float], end: tuple[float, float], *, size: int = 30) -> Stroke:
    """Drag the mouse over the canvas from ``start`` to ``end`` (fractions of its width and height) with a brush of
    ``size`` screen pixels; the stroke in image pixels, mapped as the canvas is shown."""
    page.eval_on_selector("#brush-size", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", size)
    box = page.locator("#mask-canvas").bounding_box()
    scale = PICTURE_SIZE[0] / box["width"]
    assert abs(PICTURE_SIZE[1] / box["height"] - scale) < 0.01  # the aspect is kept
    assert scale > 1.1  # the picture is shown smaller than its pixels: the mapping is exercised
    screen = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in (start, end)]
    page.mouse.move(*screen[0])
    page.mouse.down()
    page.mouse.move(*screen[1], steps=25)
    page.mouse.up()
    image = [((sx - box["x"]) * scale, (sy - box["y"]) * scale) for sx, sy in screen]
    return Stroke(image[0], image[1], size / 2 * scale)


def paint(page: Any, recording: RecordingPipe, *, steps: int = 2) -> Call:
    """Set the steps, click Paint, wait for the result; the call the server made."""
    before = len(recording.calls)
    page.fill("#opt-steps", str(steps))
    page.click("#paint")
    page.wait_for_function("document.querySelector('#message').classList.contains('success')"
                           " || document.querySelector('#message').classList.contains('error')")
    message = page.inner_text("#message")
    assert "Done" in message, message
    assert len(recording.calls) == before + 1
    return recording.calls[-1]


# Pixels this close to the brush's edge may go either way (the pointer's position is rounded to screen pixels, one
# screen pixel is ~1.3 image pixels here, and the canvas antialiases the edge); everything else must be exact.
EDGE = 2.5


def assert_mask_is(mask: np.ndarray, stroke: Stroke, *, inside: int) -> None:
    """``mask`` is ``inside`` (0 or 255) within the stroke's brush, the other value away from it."""
    assert mask.shape == (PICTURE_SIZE[1], PICTURE_SIZE[0])
    assert set(np.unique(mask)) <= {0, 255}, "the mask sent is black and white only"
    distance = stroke.distance(mask.shape)
    near, far = distance <= stroke.radius - EDGE, distance >= stroke.radius + EDGE
    assert near.sum() > 1000 and far.sum() > 100_000
    assert (mask[near] == inside).all(), f"{(mask[near] != inside).sum()} pixels on the stroke are not {inside}"
    assert (mask[far] == 255 - inside).all(), f"{(mask[far] != 255 - inside).sum()} pixels far from it are wrong"


# ---- the tests ------------------------------------------------------------------------------------------------------


def test_the_stroke_drawn_with_the_mouse_is_the_mask_the_server_receives(
        open_page: Callable[..., Any], server: str, recording: RecordingPipe, pictures: tuple[Path, Path]) -> None:
    page = open_page(server)
    load(page, pictures)
    stroke = draw(page, (0.2, 0.45), (0.8, 0.6))
    call = paint(page, recording, steps=2)
    assert call.outcome == "done" and call.steps == 2
    assert_mask_is(call.mask, stroke, inside=255)

    # The result is shown, the size of the input, with its seed and the command that repeats it.
    size = page.eval_on_selector("#result-img", "img => [img.naturalWidth, img.naturalHeight]")
    assert tuple(size) == PICTURE_SIZE
    assert page.get_attribute("#download-result", "href").startswith("data:image/png;base64,")
    seed = page.inner_text("#result-seed")
    command = page.inner_text("#command")
    assert command.startswith("pbe paint ") and f"--seed {seed}" in command and "--steps 2" in command
    assert f"your picture ({pictures[0].name}) as image.png" in page.inner_text("#command-files")
    # "Download mask" gives the very mask the server received, so the command can be run.
    mask_png = page.evaluate("""async () => {
        const blob = await (await fetch(document.querySelector('#download-mask').href)).blob();
        const bytes = new Uint8Array(await blob.arrayBuffer());
        let text = ''; for (const b of bytes) text += String.fromCharCode(b); return btoa(text); }""")
    downloaded = np.array(PIL.Image.open(io.BytesIO(base64.b64decode(mask_png))).convert("L"))
    np.testing.assert_array_equal(downloaded, call.mask)


def test_undo_removes_the_last_stroke_and_an_empty_mask_is_refused_by_the_page(
        open_page: Callable[..., Any], server: str, recording: RecordingPipe, pictures: tuple[Path, Path]) -> None:
    page = open_page(server)
    load(page, pictures)
    kept = draw(page, (0.15, 0.25), (0.45, 0.25), size=24)
    draw(page, (0.55, 0.8), (0.9, 0.75), size=40)
    page.click("#undo")
    call = paint(page, recording, steps=2)
    assert_mask_is(call.mask, kept, inside=255)  # the second stroke is gone, the first is whole

    page.keyboard.press("Control+z")
    calls = len(recording.calls)
    page.click("#paint")
    page.wait_for_function("document.querySelector('#message').classList.contains('error')")
    assert "Nothing to repaint" in page.inner_text("#message")
    assert len(recording.calls) == calls  # refused before anything was sent


def test_the_eraser_takes_back_what_it_crosses_and_invert_flips_the_mask(
        open_page: Callable[..., Any], server: str, recording: RecordingPipe, pictures: tuple[Path, Path]) -> None:
    page = open_page(server)
    load(page, pictures)
    stroke = draw(page, (0.2, 0.5), (0.8, 0.5), size=30)
    page.click("#tool-eraser")
    eraser = draw(page, (0.5, 0.2), (0.5, 0.8), size=40)
    page.click("#invert")
    call = paint(page, recording, steps=1)
    shape = call.mask.shape
    on_stroke = stroke.distance(shape) <= stroke.radius - EDGE
    off_stroke = stroke.distance(shape) >= stroke.radius + EDGE
    erased = eraser.distance(shape) <= eraser.radius - EDGE
    kept = eraser.distance(shape) >= eraser.radius + EDGE
    # Inverted: black where the stroke stayed, white where it never was and where the eraser took it back.
    assert (on_stroke & kept).sum() > 1000 and (on_stroke & erased).sum() > 500
    assert (call.mask[on_stroke & kept] == 0).all()
    assert (call.mask[on_stroke & erased] == 255).all()
    assert (call.mask[off_stroke] == 255).all()


def test_cancel_stops_a_long_painting_at_its_next_step(
        open_page: Callable[..., Any], server: str, recording: RecordingPipe, pictures: tuple[Path, Path]) -> None:
    page = open_page(server)
    load(page, pictures)
    draw(page, (0.3, 0.3), (0.6, 0.6))
    steps = int(page.get_attribute("#opt-steps", "max"))  # the sampler's ceiling, from /api/options
    assert steps >= 500
    page.fill("#opt-steps", str(steps + 1))  # past the sampler's ceiling: refused on the page, naming both
    page.click("#paint")
    page.wait_for_function("document.querySelector('#message').classList.contains('error')")
    assert page.inner_text("#message") == f'Steps: expected at most {steps} for pndm, got "{steps + 1}"'
    page.fill("#opt-steps", str(steps))
    page.click("#paint")
    page.wait_for_function("/^Step [1-9]/.test(document.querySelector('#progress-text').textContent)")
    # Another user's painting waits behind it, and says so.
    other = open_page(server)
    load(other, pictures)
    draw(other, (0.3, 0.3), (0.6, 0.6))
    other.fill("#opt-steps", "1")
    other.click("#paint")
    other.wait_for_function("document.querySelector('#progress-text').textContent === 'Queued: next'")
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#message').textContent.includes('Cancelled')")
    other.wait_for_function("document.querySelector('#message').classList.contains('success')")  # its turn came
    call = recording.calls[-2]  # the long one; the other page's painting came after it
    assert call.steps == steps
    assert call.outcome == "Cancelled", call.outcome  # the pipeline was stopped from its step callback
    assert 1 <= call.steps_run < steps / 2
    assert recording.calls[-1].steps == 1 and recording.calls[-1].outcome == "done"
    assert page.is_hidden("#cancel") and page.is_enabled("#paint")


def test_pictures_come_in_by_paste_and_drop(open_page: Callable[..., Any], server: str,
                                            pictures: tuple[Path, Path]) -> None:
    page = open_page(server)
    picture, example = (base64.b64encode(path.read_bytes()).decode() for path in pictures)
    as_file = "(b64, name) => new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], name, {type: 'image/png'})"
    paste = f"""([b64, name]) => {{ const data = new DataTransfer(); data.items.add(({as_file})(b64, name));
        document.dispatchEvent(new ClipboardEvent('paste', {{clipboardData: data, bubbles: true}})); }}"""
    # The first pasted picture becomes the picture (none yet), the next one the example.
    page.evaluate(paste, [picture, "first.png"])
    page.wait_for_selector("#canvas-box:not([hidden])")
    assert page.inner_text("#picture-note") == f"first.png · {PICTURE_SIZE[0]}×{PICTURE_SIZE[1]}"
    assert "paste-target" in page.get_attribute("#example-slot", "class")
    page.evaluate(paste, [example, "second.png"])
    page.wait_for_selector("#example-preview:not([hidden])")
    assert page.inner_text("#example-note") == "second.png"
    # A picture dropped on the example's slot replaces the example.
    page.evaluate(f"""([b64, name]) => {{ const data = new DataTransfer(); data.items.add(({as_file})(b64, name));
        document.querySelector('#example-drop').dispatchEvent(new DragEvent('drop', {{dataTransfer: data,
        bubbles: true, cancelable: true}})); }}""", [picture, "dropped.png"])
    page.wait_for_function("document.querySelector('#example-note').textContent === 'dropped.png'")
    assert page.is_enabled("#paint")


def test_the_token_in_the_address_is_sent(open_page: Callable[..., Any], token_server: str,
                                          recording: RecordingPipe, pictures: tuple[Path, Path]) -> None:
    page = open_page(token_server)  # no token: refused with the server's 401 and a hint where it goes
    load(page, pictures)
    draw(page, (0.3, 0.3), (0.6, 0.6))
    calls = len(recording.calls)
    page.fill("#opt-steps", "1")
    page.click("#paint")
    page.wait_for_function("document.querySelector('#message').classList.contains('error')")
    assert "needs a token" in page.inner_text("#message") and "#token=" in page.inner_text("#message")
    assert len(recording.calls) == calls

    page = open_page(f"{token_server}/#token={TOKEN}")
    load(page, pictures)
    draw(page, (0.3, 0.3), (0.6, 0.6))
    assert paint(page, recording, steps=1).outcome == "done"
