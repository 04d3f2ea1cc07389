"""A head-only fine-tune (model.freeze=backbone) against scikit-learn's logistic regression on the
same frozen features of the same images, for several head recipes.

The task and the backbone are tests/test_head.py's, larger where asked: an ImageFolder of JPEG
files (tests/conftest.py's `make_image_folder`: per class a colour and a stripe, with noise), and
a ResNet-18 with random but fixed weights and the BatchNorm statistics of these images, in the
seed's checkpoint.pth.tar layout (tests/test_tools.py's `_pretrained_pth_tar`). The probe:
`LogisticRegression` (scikit-learn's defaults: lbfgs, C=1) on the 512 pooled features of each
training image under validation's preprocessing, scored on the validation images. Each fine-tune
is, all at once (on a shared machine each process gets its own share of the cores):

    python run.py model.weights=<the backbone> model.freeze=backbone dataset.root=<folder>
        dataset.image_size=32 model=resnet18 train.epochs=E train.batch_size=B [the row's recipe]

with the head recipe of its row: imgtrain's default for a frozen backbone (lr 1.0 x batch / 256,
no weight decay, no warm-up), other bases (optim.lr_base), and the seed's full-network recipe
(lr 0.1 per 256 images, weight decay 1e-4, 5 warm-up epochs), which applied before.

    python benchmarks/linear_probe.py                    # test_head.py's: 4 classes, 3 epochs
    python benchmarks/linear_probe.py --classes 10 --per-class 40 --epochs 5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

from conftest import make_image_folder  # noqa: E402  (the tests' data, made the same way)
from test_head import probe_acc1  # noqa: E402
from test_tools import _pretrained_pth_tar  # noqa: E402


def start(*overrides: str) -> subprocess.Popen:
    """`python run.py` on the CPU, started."""
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), "device=cpu", "amp=O0",
                             "model=resnet18", "dataset.workers=0", "train.print_freq=1000",
                             *overrides], cwd=REPO, stdout=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--bases", default="0.25,1,4,16")
    args = parser.parse_args()
    batch = args.batch
    with tempfile.TemporaryDirectory(prefix="linear_probe") as tmp:
        tmp = Path(tmp)
        root = make_image_folder(tmp / "folder", num_classes=args.classes,
                                 per_class=args.per_class, val_per_class=args.per_class // 3)
        weights = tmp / "checkpoint.pth.tar"
        _pretrained_pth_tar(root, weights)
        seed_lr = 0.1 * batch / 256
        rows = [("the seed's recipe: lr 0.1 per 256, weight decay 1e-4, 5 warm-up epochs",
                 [f"optim.lr={seed_lr}", "optim.weight_decay=1e-4", "sched.warmup_epochs=5"],
                 seed_lr)]
        for base in args.bases.split(","):
            default = float(base) == 1.0
            rows.append((f"head recipe, base {base}" + (" (imgtrain's default)" if default else ""),
                         [] if default else [f"optim.lr_base={base}"], float(base) * batch / 256))
        common = [f"model.weights={weights}", "model.freeze=backbone", f"dataset.root={root}",
                  "dataset.image_size=32", f"train.epochs={args.epochs}",
                  f"train.batch_size={batch}", "train.save_checkpoints=false"]
        runs = [start(*common, *recipe, f"hydra.run.dir={tmp / f'run_{number}'}")
                for number, (_, recipe, _) in enumerate(rows)]
        probe = probe_acc1(weights, root)
        print(f"| head recipe ({args.epochs} epochs of batch {batch}, {args.classes} classes, "
              f"{args.per_class} train images each) | lr | val Acc@1 by epoch |")
        print("|---|---|---|")
        print(f"| scikit-learn LogisticRegression on the frozen features | | {probe:.1f} |",
              flush=True)
        for number, ((name, _, lr), process) in enumerate(zip(rows, runs)):
            if process.wait():
                raise SystemExit(f"a fine-tune failed: {tmp / f'run_{number}'}/train.log")
            results = json.loads((tmp / f"run_{number}" / "results.json").read_text())
            by_epoch = ", ".join(f"{row['acc1']:.1f}" for row in results["history"])
            print(f"| {name} | {lr:g} | {by_epoch} |", flush=True)


if __name__ == "__main__":
    main()
