"""A head-only fine-tune (model.freeze=backbone) against scikit-learn's logistic regression on the
same frozen features of the same images, for several head recipes.

The backbone: a ResNet-18 (ImageNet stem) trained briefly by imgtrain on the digits 0-9 drawn at
32 px (benchmarks/cifar_stem.py's glyphs: a random size, angle, place and pair of colours, pixel
noise; in CIFAR-10's layout). The new task: the letters A-J drawn the same way, as an ImageFolder
of JPEG files. The probe: `LogisticRegression` (scikit-learn's defaults: lbfgs, C=1) on the 512
pooled features of each training image under validation's preprocessing, scored on the
validation images. Each fine-tune is

    python run.py model.weights=<the digits' best.pt> model.freeze=backbone dataset.root=<letters>
        train.epochs=E train.batch_size=B [the row's recipe]

(the checkpoint gives the arch, its stem and 32 px), with the head recipe of its row: imgtrain's
default for a frozen backbone (lr 1.0 x batch / 256, no weight decay, no warm-up), other bases
(optim.lr_base), and the seed's full-network recipe (lr 0.1 per 256 images, weight decay 1e-4,
5 warm-up epochs), which applied before.

    python benchmarks/linear_probe.py      # digits: 2000, 2 epochs; letters: 500 / 200, 5 epochs
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifar_stem import REPO, glyph, make_glyphs

LETTERS = "ABCDEFGHIJ"


def make_letters(root: Path, train: int, val: int, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            label = i % len(LETTERS)
            folder = root / split / LETTERS[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(glyph(label, rng, LETTERS)).save(folder / f"{i}.jpg", quality=95)
    return root


def run(*overrides: str) -> dict:
    """`python run.py` on the CPU; its results.json, with the wall time."""
    out = Path(next(o for o in overrides if o.startswith("hydra.run.dir=")).partition("=")[2])
    started = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "run.py"), "device=cpu", "amp=O0",
                    "dataset.workers=0", "train.print_freq=1000", *overrides], check=True,
                   cwd=REPO, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    results = json.loads((out / "results.json").read_text())
    results["wall_seconds"] = time.perf_counter() - started
    return results


def probe_accuracy(weights: Path, letters: Path) -> float:
    """scikit-learn's logistic regression on the frozen backbone's features, val Acc@1 in %."""
    sys.path.insert(0, str(REPO / "src"))
    from sklearn.linear_model import LogisticRegression

    from imgtrain.data.imagefolder import JpegFolder
    from imgtrain.data.transforms import Normalizer
    from imgtrain.models import build_model

    from imgtrain.weights import load_into, read

    source = read(str(weights))
    model = build_model(source.arch, source.num_classes, stem=source.stem)
    load_into(model, source, source.arch, allow_new_fc=False)
    model.fc = torch.nn.Identity()
    model.eval()

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        data = JpegFolder(str(letters), split, 32, train=False)
        images = torch.stack([data[i][0] for i in range(len(data))])
        with torch.no_grad():
            found = model(Normalizer(torch.device("cpu"), False)(images))
        return found.numpy(), np.array([data[i][1] for i in range(len(data))])

    (train_x, train_y), (val_x, val_y) = features("train"), features("val")
    classifier = LogisticRegression(max_iter=5000).fit(train_x, train_y)
    return 100.0 * float((classifier.predict(val_x) == val_y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train", type=int, default=500)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--digits", type=int, default=2000)
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--bases", default="0.25,1,4")
    args = parser.parse_args()
    batch = args.batch
    with tempfile.TemporaryDirectory(prefix="linear_probe") as tmp:
        tmp = Path(tmp)
        letters = make_letters(tmp / "letters", args.train, args.val)
        digits = make_glyphs(tmp / "digits", args.digits, 500)
        pretrained = run("dataset=cifar10", f"dataset.root={digits}", "model=resnet18",
                         "model.stem=imagenet", f"train.epochs={args.pretrain_epochs}",
                         "train.batch_size=32", "optim.lr=0.05", "sched.warmup_epochs=0",
                         f"hydra.run.dir={tmp / 'digits_run'}")
        weights = tmp / "digits_run" / "checkpoints" / "best.pt"
        print(f"backbone: resnet18 trained {args.pretrain_epochs} epochs on {args.digits} digits: "
              f"val Acc@1 {pretrained['best_acc1']:.1f}", flush=True)
        probe = probe_accuracy(weights, letters)
        print(f"| head recipe ({args.epochs} epochs, batch {batch}, {args.train} / {args.val} "
              "letters) | lr | val Acc@1 by epoch | wall |")
        print("|---|---|---|---|")
        print(f"| scikit-learn LogisticRegression on the frozen features | | {probe:.1f} | |",
              flush=True)
        seed_lr = 0.1 * batch / 256
        rows = [("the seed's recipe: lr 0.1 per 256, weight decay 1e-4, 5 warm-up epochs",
                 [f"optim.lr={seed_lr}", "optim.weight_decay=1e-4", "sched.warmup_epochs=5"],
                 seed_lr)]
        for base in args.bases.split(","):
            default = float(base) == 1.0
            rows.append((f"head recipe, base {base}" + (" (imgtrain's default)" if default else ""),
                         [] if default else [f"optim.lr_base={base}"], float(base) * batch / 256))
        common = [f"model.weights={weights}", "model.freeze=backbone", f"dataset.root={letters}",
                  f"train.epochs={args.epochs}",
                  f"train.batch_size={batch}", "train.save_checkpoints=false"]
        for number, (name, recipe, lr) in enumerate(rows):
            results = run(*common, *recipe, f"hydra.run.dir={tmp / f'probe_{number}'}")
            by_epoch = ", ".join(f"{row['acc1']:.1f}" for row in results["history"])
            print(f"| {name} | {lr:g} | {by_epoch} | {results['wall_seconds']:.0f} s |",
                  flush=True)


if __name__ == "__main__":
    main()
