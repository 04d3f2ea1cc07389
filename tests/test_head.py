"""A head-only fine-tune that works: model.freeze=backbone with the head's own recipe reaches what
scikit-learn's logistic regression reaches on the same frozen features of the same images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, read_results
from imgtrain import weights
from imgtrain.data.imagefolder import JpegFolder
from imgtrain.data.transforms import Normalizer
from imgtrain.models import build_model
from test_tools import _pretrained_pth_tar, run_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision's decoders
MARGIN = 5.0  # points of val Acc@1 (32 images: one image is 3.1)


def probe_acc1(checkpoint: Path, root: Path) -> float:
    """scikit-learn's LogisticRegression (its defaults) on the frozen backbone's pooled features
    of the training images under validation's preprocessing, scored on the validation images."""
    from sklearn.linear_model import LogisticRegression

    source = weights.read(str(checkpoint))
    model = build_model("resnet18", source.num_classes)
    weights.load_into(model, source, "resnet18", allow_new_fc=False)
    model.fc = torch.nn.Identity()

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        data = JpegFolder(str(root), split, 32, train=False)
        images = torch.stack([data[i][0] for i in range(len(data))])
        with torch.no_grad():
            found = model.eval()(Normalizer(torch.device("cpu"), False)(images))
        return found.numpy(), np.array([data[i][1] for i in range(len(data))])

    (train_x, train_y), (val_x, val_y) = features("train"), features("val")
    fitted = LogisticRegression(max_iter=5000).fit(train_x, train_y)
    return 100.0 * float((fitted.predict(val_x) == val_y).mean())


def test_frozen_backbone_fine_tune_reaches_the_logistic_regression_probe(
        image_folder: Path, tmp_path: Path) -> None:
    """A random-but-fixed resnet18 (BatchNorm statistics of these images) in the seed's file
    layout, then `model.freeze=backbone` with nothing of the recipe set: 3 epochs of 6 steps. The
    seed's recipe (lr 0.1 per 256, weight decay 1e-4, 5 warm-up epochs) ends at 84.4 here."""
    source = tmp_path / "checkpoint.pth.tar"
    state = _pretrained_pth_tar(image_folder, source)
    run_dir = tmp_path / "run"
    run_app(run_dir, *TINY, "dataset=imagenet", f"dataset.root={image_folder}",
            "dataset.image_size=32", f"model.weights={source}", "model.freeze=backbone",
            "train.epochs=3", "train.batch_size=16")
    fine_tuned = read_results(run_dir)["final_acc1"]
    probe = probe_acc1(source, image_folder)
    assert fine_tuned >= probe - MARGIN, (fine_tuned, probe)
    log = (run_dir / "train.log").read_text()
    assert "lr         0.0625 = the head's 1 x global batch 16 / 256" in log
    assert "schedule   cosine\n" in log  # no warm-up
    saved = torch.load(run_dir / "checkpoints/last.pt", weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["weight_decay"] == 0.0
    # Frozen BatchNorm stayed in eval mode: its running statistics did not drift.
    assert all(torch.equal(saved["model"][k], v) for k, v in state.items() if "running" in k)
