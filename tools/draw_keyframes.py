"""Draw the interpolation examples in assets/: three keyframe pairs of simple line art, 512x320, CC0.

    python tools/draw_keyframes.py

Nothing could be downloaded when they were made, so they are drawn here with Pillow: a ball up and down, a cat
sitting and standing, the sun low and high. Run it again to remake the exact same files.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SIZE = (512, 320)
INK, PAPER, WIDTH = (30, 30, 40), (250, 248, 240), 5


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", SIZE, PAPER)
    return img, ImageDraw.Draw(img)


def ball(height: int) -> Image.Image:
    """A red ball over a ground line; `height`: pixels between the ball's bottom and the ground."""
    img, d = _canvas()
    d.line([(20, 280), (492, 280)], fill=INK, width=WIDTH)
    top = 280 - height - 80
    d.ellipse([216, top, 296, top + 80], fill=(220, 60, 50), outline=INK, width=WIDTH)
    return img


def cat(standing: bool) -> Image.Image:
    """A grey cartoon cat in profile: sitting (body upright) or standing on four legs."""
    img, d = _canvas()
    d.line([(20, 290), (492, 290)], fill=INK, width=WIDTH)
    fur = (170, 170, 180)
    if standing:
        d.ellipse([150, 150, 350, 240], fill=fur, outline=INK, width=WIDTH)            # body
        for x in (175, 215, 290, 325):                                                  # legs
            d.line([(x, 225), (x, 288)], fill=INK, width=WIDTH + 3)
        head = (330, 100)
        d.line([(155, 190), (100, 130)], fill=INK, width=WIDTH + 2)                    # tail up
    else:
        d.ellipse([190, 140, 310, 288], fill=fur, outline=INK, width=WIDTH)            # body upright
        head = (250, 80)
        d.arc([250, 220, 380, 300], 180, 300, fill=INK, width=WIDTH + 2)               # tail curled
    x, y = head
    d.ellipse([x - 45, y - 40, x + 45, y + 45], fill=fur, outline=INK, width=WIDTH)     # head
    d.polygon([(x - 40, y - 20), (x - 30, y - 65), (x - 8, y - 35)], fill=fur, outline=INK)   # ears
    d.polygon([(x + 40, y - 20), (x + 30, y - 65), (x + 8, y - 35)], fill=fur, outline=INK)
    for ex in (x - 17, x + 17):                                                          # eyes
        d.ellipse([ex - 6, y - 8, ex + 6, y + 6], fill=INK)
    return img


def sun(height: int) -> Image.Image:
    """A yellow sun `height` pixels above the line of two hills."""
    img, d = _canvas()
    cy = 250 - height
    d.ellipse([206, cy - 50, 306, cy + 50], fill=(250, 200, 40), outline=INK, width=WIDTH)
    d.pieslice([-100, 200, 300, 520], 180, 360, fill=(90, 160, 80), outline=INK, width=WIDTH)
    d.pieslice([200, 190, 620, 530], 180, 360, fill=(70, 140, 70), outline=INK, width=WIDTH)
    return img


PAIRS = {
    ("ball_up.png", "ball_down.png"): (ball(150), ball(0)),
    ("cat_sitting.png", "cat_standing.png"): (cat(False), cat(True)),
    ("sun_low.png", "sun_high.png"): (sun(10), sun(170)),
}

if __name__ == "__main__":
    for names, images in PAIRS.items():
        for name, image in zip(names, images):
            image.save(ASSETS / name, optimize=True)
            print(ASSETS / name)
