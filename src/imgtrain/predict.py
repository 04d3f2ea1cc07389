"""mode=predict: each image's top-k classes and probabilities, printed and written to predictions.csv.

Images get validation's preprocessing (resize to dataset.val_resize_size, centre-crop
val_crop_size: by default image_size/0.875 and image_size, all as the checkpoint's run had them);
the class names come from the checkpoint.
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from imgtrain.data.imagefolder import jpeg_size, read_bytes, val_image
from imgtrain.data.transforms import Normalizer
from imgtrain.device import DeviceInfo
from imgtrain.errors import ConfigError
from imgtrain.fileio import write_atomic
from imgtrain.models import build_model
from imgtrain.weights import WeightsFile, load_into

if TYPE_CHECKING:
    from imgtrain.plan import RunPlan

log = logging.getLogger("imgtrain")
BATCH = 32  # images decoded and classified at a time: bounds memory for large folders
_BAD_IMAGE = (OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError)


def gather(inputs: Any) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files named by predict.inputs (files, or folders searched recursively), and the
    problems found: missing paths and folders without images."""
    if inputs is None or isinstance(inputs, (list, tuple)):
        items = list(inputs or [])
    elif isinstance(inputs, dict):
        raise ConfigError(f"predict.inputs={inputs}: give a path or a list of paths")
    else:  # one path; Hydra reads predict.inputs=2024 as a number
        items = [inputs]
    if not items:
        raise ConfigError("mode=predict needs predict.inputs=image.jpg or "
                          "predict.inputs='[image.jpg,folder/]'")
    files, problems = [], []
    for item in items:
        path = Path(str(item)).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            files += found
            if not found:
                problems.append((path, "has no image files"))
        elif path.is_file():
            files.append(path)
        else:
            problems.append((path, "does not exist"))
    return files, problems


def _decoded(files: list[Path], sizes: tuple[int, int],
             problems: list[tuple[Path, str]]) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """Batches of (paths, uint8 images); unreadable files are added to `problems` and skipped.

    sizes: validation's (resize, crop): plan.val_resize_size and val_crop_size."""
    resize, crop = sizes
    paths, images = [], []
    for path in files:
        try:
            data = read_bytes(str(path))
            images.append(val_image(data, jpeg_size(data), crop, resize))
            paths.append(path)
        except _BAD_IMAGE as exc:
            problems.append((path, f"is not a readable image ({type(exc).__name__})"))
        if len(paths) == BATCH:
            yield paths, torch.stack(images)
            paths, images = [], []
    if paths:
        yield paths, torch.stack(images)


def predict(plan: RunPlan, out: Path, device: DeviceInfo,
            weights: WeightsFile) -> dict[str, Any]:
    topk = int(plan.predict.topk)
    if topk < 1:
        raise ConfigError(f"predict.topk={topk} must be at least 1")
    files, problems = gather(plan.predict.inputs)
    if weights.num_classes is None:
        raise ConfigError(f"model.weights {weights.path} has no fc.weight: not a classifier")
    arch = plan.model.arch
    model = build_model(arch, weights.num_classes, stem=plan.model.stem)
    load_into(model, weights, arch, allow_new_fc=False)
    model.to(device.torch_device).eval()
    names = weights.class_names
    if not names:
        log.info("model.weights %s stores no class names: printing class indices", weights.path)
    normalize = Normalizer(device.torch_device, channels_last=False)
    rows: list[tuple[str, int, int, str, float]] = []
    with torch.no_grad():
        sizes = (plan.val_resize_size, plan.val_crop_size)
        for paths, images in _decoded(files, sizes, problems):
            probs = model(normalize(images.to(device.torch_device))).float().softmax(dim=1)
            top = probs.topk(min(topk, probs.shape[1]), dim=1)
            for path, values, indices in zip(paths, top.values.tolist(), top.indices.tolist()):
                labels = [names[i] if names else str(i) for i in indices]
                log.info("%s: %s", path, ", ".join(f"{label} {100 * p:.1f}%"
                                                   for label, p in zip(labels, values)))
                rows += [(str(path), rank, i, label, p) for rank, (i, label, p)
                         in enumerate(zip(indices, labels, values), start=1)]
    if not rows:
        raise ConfigError("nothing to predict: " + "; ".join(f"{path} {reason}"
                                                              for path, reason in problems))
    for path, reason in problems:
        log.warning("warning: skipped %s: %s", path, reason)
    _write_csv(out / "predictions.csv", rows)
    images = len({row[0] for row in rows})
    log.info("predictions for %d images in %s", images, out / "predictions.csv")
    return {"mode": "predict", "status": "completed", "images": images, "skipped": len(problems)}


def _write_csv(path: Path, rows: list[tuple[str, int, int, str, float]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["path", "rank", "class_index", "class_name", "probability"])
    writer.writerows((p, rank, i, name, f"{prob:.6f}") for p, rank, i, name, prob in rows)
    write_atomic(path, lambda f: f.write(text.getvalue().encode()))
