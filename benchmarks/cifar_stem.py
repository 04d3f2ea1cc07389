"""The CIFAR stem against the ImageNet stem: ResNet-18 on 32 px images, the same epochs.

The data is made here, in CIFAR-10's pickle layout (dataset=cifar10 reads it as it reads the real
one): digits drawn in Pillow's own font at a random size (11-19 px), angle, place and pair of
colours, with pixel noise (`--alphabet` picks the digits, one class each). A class is a small
shape, not a colour: what 32 px images of objects ask of the first layers, and what the ImageNet
stem's 4x downsampling (a 7x7 stride-2 conv, then a stride-2 max-pool) blurs before layer1 sees
it, leaving layer4 1x1 maps.

    python benchmarks/cifar_stem.py            # 0-9: 5000 train / 1000 test images, 8 epochs
    python benchmarks/cifar_stem.py --alphabet 0147 --train 400 --test 200 --epochs 4

Both stems train at once, each `python run.py dataset=cifar10 model=resnet18 model.stem=...` with
the command line's recipe (on a shared machine two processes get two shares of it); the script
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


def glyph(label: int, rng: np.random.Generator, alphabet: str = "0123456789") -> np.ndarray:
    """One 32x32 RGB image of `alphabet[label]`."""
    background = rng.integers(0, 256, 3)
    foreground = (background + rng.integers(80, 176, 3)) % 256  # always some contrast
    canvas = Image.new("RGB", (48, 48), tuple(int(c) for c in background))
    font = ImageFont.load_default(size=int(rng.integers(11, 20)))
    ImageDraw.Draw(canvas).text((24, 24), alphabet[label], font=font, anchor="mm",
                                fill=tuple(int(c) for c in foreground))
    canvas = canvas.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
    left, top = (int(v) for v in rng.integers(4, 13, 2))
    pixels = np.asarray(canvas.crop((left, top, left + 32, top + 32)), dtype=np.float32)
    return (pixels + rng.normal(0, 24, pixels.shape)).clip(0, 255).astype(np.uint8)


def make_glyphs(root: Path, train: int, test: int, seed: int = 0,
                alphabet: str = "0123456789") -> Path:
    """`train` and `test` images of `alphabet`'s characters in turn, as cifar-10-batches-py/
    under `root` (CIFAR-10's ten label names, whatever classes are used)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, count in (("data_batch_1", train), ("test_batch", test)):
        labels = [i % len(alphabet) for i in range(count)]
        data = np.stack([glyph(label, rng, alphabet).transpose(2, 0, 1).reshape(-1)
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
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--alphabet", default="0123456789")
    args = parser.parse_args()
    recipe = [f"train.epochs={args.epochs}", f"train.batch_size={args.batch}",
              f"optim.lr={args.lr}", "optim.weight_decay=5e-4",
              f"sched.warmup_epochs={args.warmup}",
              "train.print_freq=1000", "train.save_checkpoints=false"]
    with tempfile.TemporaryDirectory(prefix="cifar_stem") as tmp:
        root = make_glyphs(Path(tmp) / "glyphs", args.train, args.test, alphabet=args.alphabet)
        print(f"{args.train} train / {args.test} test glyph images of {args.alphabet}; "
              f"{' '.join(recipe)}", file=sys.stderr)
        runs = {stem: start(root, stem, Path(tmp) / stem, recipe) for stem in STEMS}
        print("| stem | val Acc@1 by epoch | train loss (last epoch) | img/s | training time |")
        print("|---|---|---|---|---|")
        for stem, process in runs.items():
            if process.wait():
                raise SystemExit(f"the {stem} stem's run failed: {Path(tmp) / stem}/train.log")
            results = json.loads((Path(tmp) / stem / "results.json").read_text())
            by_epoch = ", ".join(f"{row['acc1']:.1f}" for row in results["history"])
            print(f"| {stem} | {by_epoch} | {results['history'][-1]['train_loss']:.3f} | "
                  f"{results['images_per_sec']:.1f} | "
                  f"{results['train_seconds'] / 60:.1f} min |",
                  flush=True)


if __name__ == "__main__":
    main()
