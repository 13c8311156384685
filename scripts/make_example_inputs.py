"""Draw the three example inputs shipped in ``pbe/examples/`` (Pillow only, procedural, deterministic).

* ``image.png``   512x512 garden scene: sky, hills, lawn and a wooden table, the picture to edit;
* ``mask.png``    512x512 "L" mask, white = repaint: an upright ellipse standing on the table top;
* ``example.png`` 300x260 red teapot on a plain background, the object to paint in.

Try them with
``pbe paint --image pbe/examples/image.png --mask pbe/examples/mask.png --example pbe/examples/example.png -o out.png``.
Run ``python scripts/make_example_inputs.py`` to redraw them; the result is the same on every run.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "pbe" / "examples"
SIZE = 512
SUPERSAMPLE = 2  # draw at 2x and downscale: anti-aliased edges
MAX_BYTES = 60_000

Color = tuple[int, int, int]


def _mix(a: Color, b: Color, t: float) -> Color:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))  # type: ignore[return-value]


def _vertical_gradient(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], top: Color, bottom: Color) -> None:
    x0, y0, x1, y1 = box
    for y in range(y0, y1):
        draw.line([(x0, y), (x1, y)], fill=_mix(top, bottom, (y - y0) / max(1, y1 - y0 - 1)))


def _scaled(points: list[tuple[float, float]], s: int) -> list[tuple[float, float]]:
    return [(x * s, y * s) for x, y in points]


def draw_scene() -> Image.Image:
    """Sky, hills and lawn, with a wooden table in the foreground whose top is empty."""
    s = SUPERSAMPLE
    image = Image.new("RGB", (SIZE * s, SIZE * s))
    draw = ImageDraw.Draw(image)
    horizon = 250
    _vertical_gradient(draw, (0, 0, SIZE * s, horizon * s), (92, 150, 220), (200, 225, 245))
    draw.ellipse(_scaled([(400, 40), (460, 100)], s), fill=(255, 244, 200))  # sun
    for cx, cy, rx, ry, color in [(120, 270, 260, 70, (120, 160, 110)), (420, 275, 240, 60, (105, 150, 100))]:
        draw.ellipse(_scaled([(cx - rx, cy - ry), (cx + rx, cy + ry)], s), fill=color)  # hills
    _vertical_gradient(draw, (0, horizon * s, SIZE * s, SIZE * s), (110, 170, 80), (70, 130, 50))  # lawn

    # The table: a top in perspective (a trapezoid), its front edge, and four legs.
    wood, dark, edge = (168, 112, 64), (120, 76, 40), (140, 92, 50)
    draw.ellipse(_scaled([(80, 455), (440, 490)], s), fill=(60, 110, 42))  # shadow on the grass
    for x0, x1, y1 in [(128, 142, 470), (372, 386, 470), (160, 172, 430), (342, 354, 430)]:
        draw.rectangle(_scaled([(x0, 360), (x1, y1)], s), fill=dark)
    draw.polygon(_scaled([(150, 330), (362, 330), (410, 372), (102, 372)], s), fill=wood)
    draw.rectangle(_scaled([(102, 372), (410, 384)], s), fill=edge)
    for i in range(1, 4):  # planks
        x_far, x_near = 150 + i * 53, 102 + i * 77
        draw.line(_scaled([(x_far, 330), (x_near, 372)], s), fill=edge, width=s)
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def draw_mask() -> Image.Image:
    """White = repaint: an upright ellipse standing on the table top, where an object would go."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).ellipse([(186, 196), (326, 366)], fill=255)
    return mask


def draw_example() -> Image.Image:
    """A red teapot (body, lid, knob, spout, handle) on an off-white background."""
    s, width, height = SUPERSAMPLE, 300, 260
    image = Image.new("RGB", (width * s, height * s), (238, 236, 230))
    draw = ImageDraw.Draw(image)
    red, dark_red, light = (200, 36, 40), (150, 22, 28), (245, 150, 150)
    draw.ellipse(_scaled([(70, 232), (230, 250)], s), fill=(210, 208, 200))  # shadow
    draw.ellipse(_scaled([(196, 100), (262, 186)], s), outline=dark_red, width=12 * s)  # handle
    draw.polygon(_scaled([(96, 150), (52, 92), (34, 84), (40, 100), (70, 196)], s), fill=dark_red)  # spout
    draw.ellipse(_scaled([(70, 90), (230, 240)], s), fill=red)  # body
    draw.chord(_scaled([(70, 90), (230, 240)], s), 20, 160, fill=dark_red)  # shaded underside
    draw.ellipse(_scaled([(100, 70), (200, 110)], s), fill=dark_red)  # lid
    draw.ellipse(_scaled([(138, 48), (162, 76)], s), fill=red)  # knob
    draw.ellipse(_scaled([(104, 118), (134, 160)], s), fill=light)  # highlight
    return image.resize((width, height), Image.Resampling.LANCZOS)


def save_png(image: Image.Image, path: Path) -> None:
    """Optimised PNG, written only if it changed (so redrawing leaves file times alone)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    data = buffer.getvalue()
    assert len(data) < MAX_BYTES, f"{path.name}: {len(data)} bytes, more than {MAX_BYTES}"
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)
    print(f"{path} {image.width}x{image.height} {image.mode} {len(data) / 1000:.1f} kB")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    save_png(draw_scene(), OUT / "image.png")
    save_png(draw_mask(), OUT / "mask.png")
    save_png(draw_example(), OUT / "example.png")


if __name__ == "__main__":
    main()
