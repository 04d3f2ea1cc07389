"""What `tensorboard --logdir outputs` shows, read through the real TensorBoard server's HTTP API:
the scalar tags, HParams (overrides first, metrics on existing tags), the layout, the image."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from torchvision.utils import make_grid

from imgtrain.data import build_loaders
from conftest import SHORT

NEW_TAGS = {"time/data_loading_percent", "time/eta_hours", "memory/host_rss_gib"}
OVERRIDES = ["dataset.image_size", "dataset.train_size", "dataset.val_size", "dataset.workers",
             "device", "experiment", "train.epochs", "train.print_freq", "amp", "model"]


@pytest.fixture(scope="module")
def server(plain_run: tuple[Path, subprocess.CompletedProcess]) -> Iterator[str]:
    run_dir, _ = plain_run
    tensorboard = Path(sys.executable).with_name("tensorboard")
    proc = subprocess.Popen([str(tensorboard), "--logdir", str(run_dir.parent), "--host",
                             "127.0.0.1", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = _wait_for_url(proc)
        _wait_for(lambda: "val/acc1" in get(url, "scalars/tags").get("run", {}))
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def get(url: str, route: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}data/plugin/{route}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        raw = reply.read()
    return raw if route.startswith("images/individualImage") else json.loads(raw)


def _wait_for(ready: Any, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while not ready():  # the server loads event files in the background
        assert time.time() < deadline, "TensorBoard never loaded the run"
        time.sleep(0.5)


def _wait_for_url(proc: subprocess.Popen) -> str:
    deadline = time.time() + 90
    while time.time() < deadline:
        match = re.search(r"(http://127\.0\.0\.1:\d+/)", proc.stdout.readline())
        if match:
            return match.group(1)
        if proc.poll() is not None:
            break
    raise AssertionError("TensorBoard did not start")


def test_scalars_include_time_and_memory_and_no_single_point_hparams_tags(server: str) -> None:
    tags = set(get(server, "scalars/tags")["run"])
    assert {"train/images_per_sec", "train/acc1", "val/acc1", "val/acc5", "train/epoch_loss",
            "train/epoch_images_per_sec"} | NEW_TAGS <= tags, tags
    assert not [tag for tag in tags if tag.startswith("hparams/")]
    query = urllib.parse.urlencode({"run": "run", "tag": "time/eta_hours"})
    eta = get(server, f"scalars/scalars?{query}")
    assert len(eta) == 2 and eta[-1][2] >= 0  # a point per print point (steps 2 and 4)


def test_hparams_lead_with_the_overrides_and_name_existing_tags(server: str) -> None:
    experiment = get(server, "hparams/experiment", {"experimentName": ""})
    names = [info["name"] for info in experiment["hparamInfos"]]
    leading = names[:len(OVERRIDES)]
    assert sorted(leading) == sorted(OVERRIDES), names  # every override key, before the rest
    assert {"model.arch", "optim.lr", "train.batch_size", "amp.level"} <= set(names)
    metrics = {info["name"]["tag"] for info in experiment["metricInfos"]}
    assert metrics == {"val/acc1", "val/acc5", "val/loss", "train/images_per_sec"}
    groups = get(server, "hparams/session_groups", {
        "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
        "colParams": [{"hparam": name} for name in names]
        + [{"metric": {"tag": tag}} for tag in metrics], "startIndex": 0, "sliceSize": 10})
    (group,) = groups["sessionGroups"]
    assert group["hparams"]["dataset.train_size"] == 256
    assert {value["name"]["tag"] for value in group["metricValues"]} == metrics


def test_custom_scalars_layout_puts_throughput_and_accuracy_first(server: str) -> None:
    layout = get(server, "custom_scalars/layout")
    titles = [category["title"] for category in layout["category"]]
    assert titles[:2] == ["throughput", "accuracy"]
    charts = {chart["title"]: chart["multiline"]["tag"]
              for category in layout["category"] for chart in category["chart"]}
    tags = set(get(server, "scalars/tags")["run"])
    for regexes in charts.values():  # every chart draws tags that exist
        assert all(any(re.search(regex, tag) for tag in tags) for regex in regexes), regexes
    assert {"^train/images_per_sec$", "^time/data_loading_percent$", "^train/acc1$",
            "^val/acc1$", "^val/acc5$"} <= {regex for regexes in charts.values()
                                            for regex in regexes}


def test_the_first_training_batch_is_an_image_grid(server: str, compose) -> None:
    assert "images/train_batch" in get(server, "images/tags")["run"]
    query = urllib.parse.urlencode({"run": "run", "tag": "images/train_batch", "sample": 0})
    (entry,) = get(server, f"images/images?{query}")  # once per run
    assert entry["step"] == 0
    grid = Image.open(io.BytesIO(get(server, f"images/individualImage?{entry['query']}")))
    # What the network saw: the run's first batch, rebuilt here, in its uint8 colours (a
    # normalised tensor would show clipped to black and white), 32 images 8 a row.
    cfg = OmegaConf.to_container(compose(*SHORT), resolve=True)
    loaders = build_loaders(cfg["dataset"], cfg["train"]["batch_size"], 0, 1, 1,
                            cfg["train"]["seed"], accelerator=False)
    loaders.train_sampler.set_epoch(0)
    images, _ = next(iter(loaders.train))
    expected = make_grid(images[:32], nrow=8, padding=2).permute(1, 2, 0).numpy()
    assert grid.size == (8 * 34 + 2, 4 * 34 + 2)
    assert (np.asarray(grid.convert("RGB")) == expected).all()
