"""A screenshot of ``pbe serve``'s page for the README (``scripts/serve-screenshot.png``), taken as a person uses it.

Starts the server (``pbe.serve.create_app`` under uvicorn, on a free local port) around a pipeline on ``--checkpoint``
(default: the test suite's tiny stand-in, whose random weights paint noise), opens the page in Debian's chromium
(Playwright), chooses ``pbe/examples/image.png`` and ``example.png``, brushes over the table top where
``pbe/examples/mask.png`` marks it, turns on "Keep unmasked pixels", paints and saves the window, reduced to a palette
PNG under ``--max-kb``.

    python scripts/screenshot_serve.py                        # the stand-in: seconds on a CPU
    python scripts/screenshot_serve.py --checkpoint Fantasy-Studio/Paint-by-Example --steps 50   # the real thing
"""

from __future__ import annotations

import argparse
import io
import math
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import PIL.Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "pbe" / "examples"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Where pbe/examples/mask.png stands (image pixels of the 512x512 scene): an upright ellipse on the table top.
ELLIPSE_CENTRE, ELLIPSE_AXES = (256.0, 281.0), (70.0, 85.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=os.path.relpath(ROOT / "tests" / "fixtures" / "hub"),
                        help="what the server paints with (default: the tiny stand-in)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--seed", default="7", help="the seed typed into the page (default 7)")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "scripts" / "serve-screenshot.png")
    parser.add_argument("--max-kb", type=int, default=300, help="largest PNG written, in KB (default 300)")
    parser.add_argument("--chromium", type=Path, default=Path("/usr/bin/chromium"))
    args = parser.parse_args(argv)
    if not args.chromium.is_file():
        parser.error(f"--chromium: {args.chromium} is missing; run `bash scripts/setup_and_test.sh` (it installs it)")

    import uvicorn
    from playwright.sync_api import sync_playwright

    from pbe import PaintByExample
    from pbe.options import ModelOptions
    from pbe.serve import create_app

    model = ModelOptions(checkpoint=args.checkpoint, device="cpu", dtype="fp32")
    pipe = PaintByExample.from_pretrained(args.checkpoint, torch_dtype=model.torch_dtype, device=model.device)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(pipe, model=model), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("the server did not start")
        time.sleep(0.05)
    try:
        with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=str(args.chromium), headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1366, "height": 768})
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("body[data-ready=true]")
            page.set_input_files("#picture-file", str(EXAMPLES / "image.png"))
            page.set_input_files("#example-file", str(EXAMPLES / "example.png"))
            page.wait_for_selector("#canvas-box:not([hidden])")
            _brush_ellipse(page)
            page.fill("#opt-steps", str(args.steps))
            page.uncheck("#seed-random")
            page.fill("#seed", args.seed)
            page.click("#advanced summary")
            page.check("#opt-keep_unmasked")
            page.click("#paint")
            page.wait_for_selector("#result-img:not([hidden])", timeout=3_600_000)
            page.mouse.move(5, 5)  # the brush's cursor off the picture
            shot = page.screenshot()
            context.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    data = _small_png(shot, args.max_kb * 1000)
    args.output.write_bytes(data)
    print(f"wrote {args.output} ({len(data) // 1000} KB)")
    return 0


def _brush_ellipse(page) -> None:  # noqa: ANN001 (a Playwright page)
    """Brush horizontal strokes across the ellipse, as a person fills a shape."""
    box = page.locator("#mask-canvas").bounding_box()
    scale = box["width"] / 512
    page.eval_on_selector("#brush-size", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                          round(30 * scale))
    (cx, cy), (ax, ay) = ELLIPSE_CENTRE, ELLIPSE_AXES
    for y in range(int(cy - ay) + 12, int(cy + ay) - 8, 20):
        half = ax * math.sqrt(max(0.0, 1 - ((y - cy) / ay) ** 2)) - 10
        if half <= 0:
            continue
        page.mouse.move(box["x"] + (cx - half) * scale, box["y"] + y * scale)
        page.mouse.down()
        page.mouse.move(box["x"] + (cx + half) * scale, box["y"] + y * scale, steps=8)
        page.mouse.up()


def _small_png(png: bytes, limit: int) -> bytes:
    """The screenshot as a palette PNG (the page's flat colours survive 256 colours); fewer if over ``limit``."""
    image = PIL.Image.open(io.BytesIO(png)).convert("RGB")
    for colours in (256, 128, 64):
        out = io.BytesIO()
        image.quantize(colors=colours, method=PIL.Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
        if out.tell() <= limit:
            return out.getvalue()
    raise SystemExit(f"the screenshot is {out.tell() // 1000} KB even with 64 colours, over {limit // 1000} KB")


if __name__ == "__main__":
    sys.exit(main())
