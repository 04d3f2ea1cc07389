"""Handwritten-like digits 0-9 as a small ImageFolder of JPEGs: a data set of your own to try
imgtrain's small-images preset on (benchmarks/small_images.py trains on it).

    python scripts/make_digits.py data/digits            # 300 train / 100 val images a class, 32 px
    python run.py experiment=small_images dataset.root=data/digits dataset.hflip=0

Each digit is drawn with one of the DejaVu fonts (sans, serif, mono; book, bold, oblique,
condensed) at a random weight, then bent as a hand would: a random affine (rotation, shear, scale,
offset), a smooth elastic warp of the strokes, a blur, ink and paper of random greys, and noise.
The fonts come with most Linux systems (fonts-dejavu); PIL's own default font is used without them.
"""
from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from scipy.ndimage import gaussian_filter, map_coordinates

CANVAS = 96  # drawn large, then warped and shrunk: smooth strokes at 32 px
FONT_GLOBS = ("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf", "/usr/share/fonts/**/DejaVu*.ttf")


def fonts() -> list[str]:
    found = sorted({path for pattern in FONT_GLOBS for path in glob.glob(pattern, recursive=True)
                    if "ExtraLight" not in path})  # too thin to survive 32 px
    return found or [""]  # "": PIL's default font


def _font(path: str, size: int) -> ImageFont.ImageFont:
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size)


def _draw(digit: int, font_path: str, rng: np.random.Generator) -> np.ndarray:
    """The digit as ink coverage in [0, 1] on the canvas, centred, of a random size and weight."""
    image = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(image)
    font = _font(font_path, int(rng.integers(52, 72)))
    text, stroke = str(digit), int(rng.integers(0, 4))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    x = (CANVAS - (right - left)) / 2 - left + rng.normal(0, 3)
    y = (CANVAS - (bottom - top)) / 2 - top + rng.normal(0, 3)
    draw.text((x, y), text, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    return np.asarray(image, dtype=np.float32) / 255


def _bend(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random affine and a smooth elastic displacement (Simard et al. 2003's MNIST distortion)."""
    angle, shear = np.deg2rad(rng.normal(0, 10)), rng.normal(0, 0.2)
    scale = rng.uniform(0.85, 1.1)
    cos, sin = np.cos(angle), np.sin(angle)
    inverse = np.linalg.inv(np.array([[cos, -sin], [sin, cos]]) @ np.array([[1, shear], [0, 1]])
                            * scale)
    centre = (CANVAS - 1) / 2
    rows, cols = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32) - centre
    src = inverse @ np.stack([cols.ravel(), rows.ravel()])
    elastic = [gaussian_filter(rng.uniform(-1, 1, ink.shape), 8) * 90 for _ in range(2)]
    src_cols = src[0].reshape(ink.shape) + centre + elastic[0] + rng.normal(0, 4)
    src_rows = src[1].reshape(ink.shape) + centre + elastic[1] + rng.normal(0, 4)
    return map_coordinates(ink, [src_rows, src_cols], order=1, mode="constant")


def digit_image(digit: int, size: int, font_path: str, rng: np.random.Generator) -> Image.Image:
    ink = _bend(_draw(digit, font_path, rng), rng)
    ink = np.asarray(Image.fromarray((ink * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0))).resize((size, size),
                                                                Image.Resampling.LANCZOS),
        dtype=np.float32)[..., None] / 255
    paper = rng.uniform(150, 255) + rng.normal(0, 12, 3)
    pen = rng.uniform(0, 110) + rng.normal(0, 12, 3)
    pixels = paper * (1 - ink) + pen * ink + rng.normal(0, rng.uniform(3, 15), (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def make_digits(root: Path, train_per_class: int, val_per_class: int, size: int,
                seed: int) -> Path:
    rng, faces = np.random.default_rng(seed), fonts()
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for digit in range(10):
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                face = faces[int(rng.integers(len(faces)))]
                digit_image(digit, size, face, rng).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the ImageFolder to write (train/ and val/)")
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_digits(args.root, args.train_per_class, args.val_per_class, args.size, args.seed)
    print(f"{args.root}: {10 * args.train_per_class} train / {10 * args.val_per_class} val "
          f"images of {args.size} px, 10 classes, {len(fonts())} fonts")


if __name__ == "__main__":
    main()
