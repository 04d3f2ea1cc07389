"""Small images of your own: experiment=small_images against the quickstart's settings copied by
hand (issue #32's first try), on handwritten-like 32 px digits (scripts/make_digits.py), at the
same epochs. Prints val Acc@1 and the last epoch's train Acc@1 (on augmented batches, as the
console's `epoch N done` line gives it) for both, then a sweep of test sizes of the preset's model.

    python benchmarks/small_images.py --out /tmp/small_images [--epochs 10]

Each run is `python run.py ...` as a user types it; the folders stay under --out.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from make_digits import make_digits  # noqa: E402

# The quickstart's recipe (conf/experiment/quickstart.yaml) on an ImageFolder, as issue #32's
# user copied it: ImageNet's crop (scale 0.08-1) and flip, no label smoothing, weight decay 1e-4.
QUICKSTART_BY_HAND = ["model=resnet18", "amp=O0", "dataset.image_size=32", "train.batch_size=64",
                      "optim.lr_base=0.4", "sched.warmup_epochs=1"]
# As README "Your own data" says for digits: the preset, and no flip.
PRESET = ["experiment=small_images", "dataset.hflip=0"]
EPOCH_LINE = re.compile(r"epoch (\d+) done: train loss [\d.]+ acc1 ([\d.]+) \| val loss [\d.]+ "
                        r"acc1 ([\d.]+)")


def start(name: str, overrides: list[str], out: Path, data: Path, epochs: int) -> tuple:
    """`python run.py` of one setting, started; loader workers none (32 px JPEGs decode in
    well under a millisecond: worker processes would only take the model's cores)."""
    run_dir = out / name
    command = [sys.executable, str(REPO / "run.py"), *overrides, f"dataset.root={data}",
               f"train.epochs={epochs}", "dataset.workers=0", "train.resume=new",
               f"hydra.run.dir={run_dir}"]
    return name, run_dir, time.time(), subprocess.Popen(command, cwd=REPO,
                                                        stdout=subprocess.DEVNULL)


def finish(name: str, run_dir: Path, started: float, proc: subprocess.Popen) -> dict:
    if proc.wait() != 0:
        raise SystemExit(f"{name} failed: see {run_dir / 'train.log'}")
    seconds = time.time() - started
    epochs_seen = EPOCH_LINE.findall((run_dir / "train.log").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    return {"name": name, "val_acc1": [float(val) for _, _, val in epochs_seen],
            "train_acc1": float(epochs_seen[-1][1]), "final_acc1": results["final_acc1"],
            "best_acc1": results["best_acc1"], "seconds": seconds,
            "images_per_sec": results["images_per_sec"], "run_dir": str(run_dir)}


def size_sweep(run_dir: Path, out: Path, data: Path) -> str:
    """mode=eval over test sizes of the run's last checkpoint: its table, as printed."""
    command = [sys.executable, str(REPO / "run.py"), "mode=eval", "device=cpu",
               f"model.weights={run_dir / 'checkpoints' / 'last.pt'}", f"dataset.root={data}",
               "dataset.workers=0",
               "eval.sizes=[[32,32],[37,32],[40,36],[46,40]]", f"hydra.run.dir={out / 'sweep'}"]
    done = subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--val-per-class", type=int, default=100)
    args = parser.parse_args()
    data = args.out / "digits"
    if not data.exists():
        make_digits(data, args.train_per_class, args.val_per_class, 32, seed=0)
    # Side by side: on a shared machine both get the same share of it.
    started = [start("preset", PRESET, args.out, data, args.epochs),
               start("quickstart_by_hand", QUICKSTART_BY_HAND, args.out, data, args.epochs)]
    rows = [finish(*run) for run in started]
    print(f"{'settings':20} {'val acc1 (final)':>16} {'best':>7} {'train acc1':>10} "
          f"{'img/s':>6} {'wall s':>7}")
    for row in rows:
        print(f"{row['name']:20} {row['final_acc1']:16.2f} {row['best_acc1']:7.2f} "
              f"{row['train_acc1']:10.2f} {row['images_per_sec']:6.1f} {row['seconds']:7.0f}")
        print(f"  val acc1 by epoch: {', '.join(f'{v:.1f}' for v in row['val_acc1'])}")
    print(size_sweep(Path(rows[0]["run_dir"]), args.out, data))
    (args.out / "small_images.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
