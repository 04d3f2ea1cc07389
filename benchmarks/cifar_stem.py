"""The CIFAR stem against the ImageNet stem: ResNet-18 on 32 px images, the same epochs.

The data is made here, in CIFAR-10's pickle layout (dataset=cifar10 reads it as it reads the real
one): one character of `--alphabet` a class (the digits by default), drawn in Pillow's own font at
a random size in `--glyph-size` px and a random place, with pixel noise (σ 16). By default the
characters are small (8-12 px) and dark on a light grey: the class is in a few pixels of detail,
as in CIFAR's 32 px objects, and the ImageNet stem's 4x downsampling (a 7x7 stride-2 conv, then a
stride-2 max-pool) leaves layer1 8x8 maps of it. `--glyph-size 14 22` draws characters large
enough to survive that downsampling, and `--colour` random colours instead of grey, the character
lighter or darker than its background by a luminance of at least 90 (benchmarks/README.md, *The
CIFAR stem*, for what each stem made of them).

    python benchmarks/cifar_stem.py                          # 3000 train / 1000 test, 8 epochs
    python benchmarks/cifar_stem.py --glyph-size 14 22 --colour

The two stems train one after the other, each `python run.py dataset=cifar10 model=resnet18
model.stem=...` with the command line's recipe, so each has the machine to itself; the script
prints one Markdown row per stem: val Acc@1 after each epoch, the last epoch's train loss, img/s
and the time spent training (results.json's train_seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
STEMS = ("imagenet", "cifar")
LUMINANCE = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as Pillow's convert("L")


def colours(rng: np.random.Generator, colour: bool) -> tuple[np.ndarray, np.ndarray]:
    """(background, foreground) RGB: grey, the character darker; or any two colours whose
    luminance differs by at least 90 of 255, either way round."""
    if not colour:
        return np.full(3, rng.integers(150, 256)), np.full(3, rng.integers(0, 100))
    while True:
        background, foreground = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if abs((foreground - background) @ LUMINANCE) >= 90:
            return background, foreground


def glyph(label: int, rng: np.random.Generator, alphabet: str = "0123456789",
          size: tuple[int, int] = (8, 12), colour: bool = False) -> np.ndarray:
    """One 32x32 RGB image of `alphabet[label]` at a font size in `size` px (both included)."""
    background, foreground = colours(rng, colour)
    canvas = Image.new("RGB", (32, 32), tuple(int(c) for c in background))
    font_size = int(rng.integers(size[0], size[1] + 1))
    margin = font_size // 2  # the character's middle this far from the edges: all of it in frame
    centre = tuple(int(v) for v in rng.integers(margin, 32 - margin + 1, 2))
    ImageDraw.Draw(canvas).text(centre, alphabet[label], anchor="mm",
                                font=ImageFont.load_default(size=font_size),
                                fill=tuple(int(c) for c in foreground))
    pixels = np.asarray(canvas, dtype=np.float32)
    return (pixels + rng.normal(0, 16, pixels.shape)).clip(0, 255).astype(np.uint8)


def make_glyphs(root: Path, train: int, test: int, seed: int = 0,
                alphabet: str = "0123456789", size: tuple[int, int] = (8, 12),
                colour: bool = False) -> Path:
    """`train` and `test` images of `alphabet`'s characters in turn, as cifar-10-batches-py/
    under `root` (CIFAR-10's ten label names, whatever classes are used)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("data_batch_1", train), ("test_batch", test)):
        labels = [i % len(alphabet) for i in range(count)]
        data = np.stack([glyph(label, rng, alphabet, size, colour).transpose(2, 0, 1).reshape(-1)
                         for label in labels])
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": "glyphs", "labels": labels, "data": data,
                         "filenames": [f"{i}.png" for i in range(count)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    return root


def start(root: Path, stem: str, out: Path, recipe: list[str]) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "run.py"), "dataset=cifar10", f"dataset.root={root}",
               "model=resnet18", f"model.stem={stem}", "device=cpu", "amp=O0",
               "dataset.hflip=0",  # digits have a handedness: a mirrored 7 is no 7
               "dataset.workers=0", f"hydra.run.dir={out}", *recipe]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=0)
    parser.add_argument("--alphabet", default="0123456789")
    parser.add_argument("--glyph-size", type=int, nargs=2, default=(8, 12), metavar=("MIN", "MAX"),
                        help="the font size in px, a random one in [MIN, MAX]")
    parser.add_argument("--stems", nargs="+", choices=STEMS, default=STEMS,
                        help="run these only (e.g. the ImageNet stem for more epochs alone)")
    parser.add_argument("--colour", action="store_true",
                        help="random colour pairs with a luminance contrast, not dark on grey")
    args = parser.parse_args()
    recipe = [f"train.epochs={args.epochs}", f"train.batch_size={args.batch}",
              f"optim.lr={args.lr}", "optim.weight_decay=5e-4",
              f"sched.warmup_epochs={args.warmup}",
              "train.print_freq=1000", "train.save_checkpoints=false"]
    with tempfile.TemporaryDirectory(prefix="cifar_stem") as tmp:
        root = make_glyphs(Path(tmp) / "glyphs", args.train, args.test, alphabet=args.alphabet,
                           size=tuple(args.glyph_size), colour=args.colour)
        print(f"{args.train} train / {args.test} test glyph images of {args.alphabet}, "
              f"{args.glyph_size[0]}-{args.glyph_size[1]} px, "
              f"{'colour' if args.colour else 'grey'}; {' '.join(recipe)}", file=sys.stderr)
        print("| stem | val Acc@1 by epoch | train loss (last epoch) | img/s | training time |")
        print("|---|---|---|---|---|")
        for stem in args.stems:
            out = Path(tmp) / stem
            if start(root, stem, out, recipe).wait():
                raise SystemExit(f"the {stem} stem's run failed: {out}/train.log")
            results = json.loads((out / "results.json").read_text())
            by_epoch = ", ".join(f"{row['acc1']:.1f}" for row in results["history"])
            print(f"| {stem} | {by_epoch} | {results['history'][-1]['train_loss']:.3f} | "
                  f"{results['images_per_sec']:.1f} | "
                  f"{results['train_seconds'] / 60:.1f} min |",
                  flush=True)


if __name__ == "__main__":
    main()
