"""mode=export: model.onnx (normalisation inside the graph) and classes.json beside the checkpoint
they come from (export.dir: elsewhere), as timm's onnx_export writes where it is told, not in a
run folder of its own.

The graph's input is float32 NCHW RGB in [0, 1], resized and centre-cropped as validation does
(dataset.val_resize_size, then val_crop_size: by default image_size/0.875, then image_size);
ImageNet's mean and std are applied inside, so a runtime needs no knowledge of them. The output
is the logits, one row per image.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from imgtrain.config import ExportConfig
from imgtrain.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from imgtrain.errors import ConfigError
from imgtrain.fileio import write_atomic
from imgtrain.models import build_model
from imgtrain.weights import WeightsFile, load_into

if TYPE_CHECKING:
    from imgtrain.plan import RunPlan

log = logging.getLogger("imgtrain")
FORMATS = ("onnx",)
EXPORTERS = ("auto", "dynamo", "torchscript")
DYNAMO_MIN_OPSET = 18  # the torch.export-based exporter emits opset 18 and newer
INSTALL_HINT = "pip install 'imgtrain[export]'"


class Normalized(nn.Module):
    """The network behind ImageNet normalisation: [0, 1] RGB in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def _settings(export_cfg: ExportConfig) -> tuple[int, str, int | None]:
    """(opset, exporter, fixed batch or None for a dynamic one), checked."""
    if export_cfg.format not in FORMATS:
        raise ConfigError(f"unknown export.format {export_cfg.format!r}; choose "
                          f"{', '.join(FORMATS)}")
    opset, exporter, batch = int(export_cfg.opset), export_cfg.exporter, export_cfg.batch
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown export.exporter {exporter!r}; choose {', '.join(EXPORTERS)}")
    if exporter == "auto":
        exporter = "dynamo" if opset >= DYNAMO_MIN_OPSET else "torchscript"
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ConfigError(f"export.opset={opset}: the dynamo exporter needs opset >= "
                          f"{DYNAMO_MIN_OPSET}; use export.exporter=torchscript for older opsets")
    if batch != "dynamic" and (not str(batch).isdigit() or int(batch) < 1):
        raise ConfigError(f"export.batch={batch!r}: use dynamic or a positive number")
    return opset, exporter, None if batch == "dynamic" else int(batch)


def _require(*modules: str) -> None:
    import importlib.util
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"mode=export needs {', '.join(missing)}: {INSTALL_HINT}")


def to_onnx(model: nn.Module, path: Path, image_size: int, opset: int, exporter: str,
            batch: int | None) -> None:
    """Write `model` (in eval mode, on the CPU) to `path` as one self-contained ONNX file."""
    _require("onnx", *(["onnxscript"] if exporter == "dynamo" else []))
    example = torch.rand(batch or 2, 3, image_size, image_size)
    names = dict(input_names=["images"], output_names=["logits"], opset_version=opset)
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):  # their per-pass INFO lines
        logging.getLogger(name).setLevel(logging.WARNING)
    tmp = path.with_name(f".{path.name}.tmp")  # a failed export leaves no half-written model.onnx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and progress chatter
        if exporter == "dynamo":
            shapes = None if batch else ({0: torch.export.Dim("batch", min=1)},)
            program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=shapes,
                                        verbose=False, **names)
            program.save(str(tmp), external_data=False)  # one file: weights inside
        else:
            axes = None if batch else {"images": {0: "batch"}, "logits": {0: "batch"}}
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, dynamic_axes=axes,
                              **names)
    tmp.replace(path)
    import onnx
    onnx.checker.check_model(str(path))


def check_onnxruntime(model: nn.Module, path: Path, image_size: int, batch: int | None) -> float | None:
    """The largest difference between onnxruntime's and PyTorch's logits (None without onnxruntime)."""
    try:
        import onnxruntime
    except ImportError:
        log.info("onnxruntime is not installed: the exported model was not run (%s)", INSTALL_HINT)
        return None
    images = torch.rand(batch or 3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (ours,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        return float((torch.from_numpy(ours) - model(images)).abs().max())


def output_folder(plan: RunPlan, weights: WeightsFile) -> Path:
    """Where the exported files go: export.dir, else the checkpoint's own folder."""
    folder = Path(plan.export.dir).expanduser() if plan.export.dir else weights.path.parent
    writable = folder if folder.exists() else next(p for p in folder.parents if p.exists())
    if not os.access(writable, os.W_OK):
        raise ConfigError(f"cannot write model.onnx to {folder} (not writable): set "
                          "export.dir=<a folder> to export elsewhere")
    return folder


def export(plan: RunPlan, weights: WeightsFile) -> dict[str, Any]:
    opset, exporter, batch = _settings(plan.export)
    out = output_folder(plan, weights)
    arch, size = plan.model.arch, plan.val_crop_size  # validation's crop
    if weights.num_classes is None:
        raise ConfigError(f"model.weights {weights.path} has no fc.weight: not a classifier")
    model = build_model(arch, weights.num_classes, stem=plan.model.stem)
    load_into(model, weights, arch, allow_new_fc=False)
    wrapped = Normalized(model).eval()
    path = out / "model.onnx"
    out.mkdir(parents=True, exist_ok=True)
    to_onnx(wrapped, path, size, opset, exporter, batch)
    names = weights.class_names or [str(i) for i in range(weights.num_classes)]
    if not weights.class_names:
        log.info("model.weights %s stores no class names: classes.json lists class indices",
                 weights.path)
    write_atomic(out / "classes.json", lambda f: f.write((json.dumps(names, indent=1) + "\n").encode()))
    diff = check_onnxruntime(wrapped, path, size, batch)
    log.info("exported %s (%s, opset %d, %s exporter, batch %s, input float32 NCHW RGB in [0, 1] "
             "of %dx%d)%s", weights.path.name, arch, opset, exporter, batch or "dynamic",
             size, size, "" if diff is None else f"; onnxruntime matches PyTorch within {diff:.2e}")
    log.info("  onnx       %s", path.resolve())
    log.info("  classes    %s", (out / "classes.json").resolve())
    return {"mode": "export", "status": "completed", "onnx": str(path), "max_abs_diff": diff}
