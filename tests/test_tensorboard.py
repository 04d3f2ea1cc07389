"""What `tensorboard --logdir outputs` shows, read through the real TensorBoard server's HTTP API:
the landing page's tag groups, HParams over runs of different overrides, the layout, the image."""
from __future__ import annotations

import functools
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
from PIL import Image
from torchvision.utils import make_grid

from imgtrain.data import build_loaders
from imgtrain.distributed import World
from imgtrain.resolve import resolve
from conftest import SHORT, run_cli

NEW_TAGS = {"throughput/loader_wait_percent", "time/eta_hours", "train/memory_host_rss_gib"}
# The second run: other override keys than the first's, a swept lr, and the image grid asked for;
# its amp and model from the experiment alone (no amp= or model= typed), in the folder its
# command names under outputs/.
SECOND = ["optim.lr=0.2", "train.log_images=true", "train.steps_per_epoch=1"]
SECOND_SHORT = [item for item in SHORT if not item.startswith(("amp=", "model="))]
MAIN_COLUMNS = {"experiment", "model.arch", "dataset.name", "amp.level", "world_size",
                "train.batch_size", "optim.lr", "train.epochs", "device", "optim.weight_decay",
                "sched.name", "sched.warmup_epochs"}
RUNS: dict[str, str] = {}  # "first"/"second" -> the run's name in TensorBoard (its folder)


@pytest.fixture(scope="module")
def server(plain_run: tuple[Path, subprocess.CompletedProcess]) -> Iterator[str]:
    run_dir, _ = plain_run
    second = run_cli(*SECOND_SHORT, *SECOND, cwd=run_dir.parent.parent)
    assert second.returncode == 0, second.stderr
    [second_dir] = run_dir.parent.glob("2*/*")  # outputs/<date>/<time>_<short name>
    RUNS.update(first="run", second=str(second_dir.relative_to(run_dir.parent)))
    tensorboard = Path(sys.executable).with_name("tensorboard")
    proc = subprocess.Popen([str(tensorboard), "--logdir", str(run_dir.parent), "--host",
                             "127.0.0.1", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = _wait_for_url(proc)
        _wait_for(lambda: all("accuracy/val_acc1" in get(url, "scalars/tags").get(run, {})
                              for run in RUNS.values()))
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


def _tensorboard_order(first: str, second: str) -> int:
    """TensorBoard's tag order (its web app's compareTagNames): numbers by value, "/" and digits
    before any other character."""
    i = j = 0
    while True:
        if i == len(first):
            return 0 if j == len(second) else -1
        if j == len(second):
            return 1
        if first[i].isdigit() and second[j].isdigit():
            a, b = re.match(r"\d+", first[i:]).group(), re.match(r"\d+", second[j:]).group()
            if int(a) != int(b):
                return -1 if int(a) < int(b) else 1
            i, j = i + len(a), j + len(b)
            continue
        special_first, special_second = first[i] in "/0123456789", second[j] in "/0123456789"
        if special_first != special_second:
            return -1 if special_first else 1
        if not special_first and first[i] != second[j]:
            return -1 if first[i] < second[j] else 1
        i, j = i + 1, j + 1


def landing_page_groups(server: str, run: str) -> list[tuple[str, list[str]]]:
    """Time Series' groups as its web app builds them from the tags: every tag (scalar or image)
    in TensorBoard's order, grouped by its part before the first "/"; the first two open."""
    index = get(server, "timeseries/tags")
    tags = index["scalars"]["runTagInfo"].get(run, []) + [
        tag for tag, runs in index["images"]["tagRunSampledInfo"].items() if run in runs]
    groups: dict[str, list[str]] = {}
    for tag in sorted(tags, key=functools.cmp_to_key(_tensorboard_order)):
        groups.setdefault(tag.split("/", 1)[0], []).append(tag)
    return list(groups.items())


def test_the_landing_page_opens_on_accuracy_and_throughput(server: str) -> None:
    groups = landing_page_groups(server, "run")
    opened = dict(groups[:2])
    assert list(opened) == ["accuracy", "throughput"], groups
    assert opened["accuracy"] == ["accuracy/val_acc1", "accuracy/val_acc5"]
    assert {"throughput/images_per_sec", "throughput/epoch_images_per_sec",
            "throughput/loader_wait_percent"} <= set(opened["throughput"])
    closed = {tag for _, tags in groups[2:] for tag in tags}
    assert {"train/acc1", "train/loss", "train/lr", "val/loss", "time/eta_hours",
            "train/memory_host_rss_gib"} <= closed, groups
    assert not [tag for _, tags in groups for tag in tags if "first_batch" in tag]  # opt-in


def test_scalars_include_time_and_memory_and_no_single_point_hparams_tags(server: str) -> None:
    tags = set(get(server, "scalars/tags")["run"])
    assert {"throughput/images_per_sec", "train/acc1", "accuracy/val_acc1",
            "accuracy/val_acc5", "train/epoch_loss",
            "throughput/epoch_images_per_sec"} | NEW_TAGS <= tags, tags
    assert not [tag for tag in tags if tag.startswith("hparams/")]
    query = urllib.parse.urlencode({"run": "run", "tag": "time/eta_hours"})
    eta = get(server, f"scalars/scalars?{query}")
    assert len(eta) == 2 and eta[-1][2] >= 0  # a point per print point (steps 2 and 4)
    # One epoch: val/loss has it; the chart that leaves out the first epoch has nothing yet.
    assert "val/loss" in tags and "val/loss_from_epoch_2" not in tags


def test_hparams_show_every_runs_overrides_and_the_same_main_columns(server: str) -> None:
    experiment = get(server, "hparams/experiment", {"experimentName": ""})
    infos = {info["name"]: info for info in experiment["hparamInfos"]}
    # Each run's own override keys (dataset.train_size only the first's, train.log_images only
    # the second's), and the main columns of both. A group chosen on the command line (amp=O0,
    # model=resnet18) is its main column's value, not a column of its own that runs which chose
    # it through the experiment would leave empty.
    assert {"dataset.train_size", "train.log_images", "train.steps_per_epoch",
            "optim.lr"} | MAIN_COLUMNS <= set(infos), sorted(infos)
    assert not {"amp", "model"} & set(infos), sorted(infos)
    # The swept lr differs, so TensorBoard lists (and its table shows) it among the first.
    differing = [name for name, info in infos.items() if info.get("differs")]
    assert "optim.lr" in differing and list(infos)[:len(differing)] == differing, infos
    # Validation's Acc@1 is the first metric (the table shows the first five), not training's
    # print-point accuracy.
    metrics = [info["name"]["tag"] for info in experiment["metricInfos"]]
    assert metrics[:4] == ["accuracy/val_acc1", "accuracy/val_acc5",
                           "throughput/epoch_images_per_sec", "throughput/images_per_sec"]
    assert "train/acc1" in metrics
    groups = get(server, "hparams/session_groups", {
        "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS"],
        "colParams": [{"hparam": name} for name in infos]
        + [{"metric": {"tag": tag}} for tag in metrics], "startIndex": 0, "sliceSize": 10})
    rows = {group["name"]: group for group in groups["sessionGroups"]}
    # Trial IDs: each run's folder name, short and distinct (not the run's path from the logdir,
    # which starts with the date and is cut there); a run under outputs/<date>/ by its
    # <time>_<short name>.
    second = Path(RUNS["second"])
    assert set(rows) == {"run", second.name}, sorted(rows)
    assert re.match(r"\d\d-\d\d-\d\d_quickstart_", second.name), second
    assert "_lr0.2_" in second.name and len(second.name) <= 60, second
    for group in rows.values():  # both runs fill every main column and have their Acc@1
        assert MAIN_COLUMNS <= set(group["hparams"]), group["hparams"]
        assert all(group["hparams"][key] not in ("", None) for key in MAIN_COLUMNS), group
        assert group["hparams"]["amp.level"] == "O0" and group["hparams"]["model.arch"] == "resnet18"
        assert group["hparams"]["experiment"] == "quickstart"
        assert group["hparams"]["dataset.name"] == "synthetic"
        assert "accuracy/val_acc1" in {value["name"]["tag"] for value in group["metricValues"]}
    assert sorted(group["hparams"]["optim.lr"] for group in rows.values()) == [0.1, 0.2]


def test_custom_scalars_layout_puts_accuracy_and_throughput_first(server: str) -> None:
    layout = get(server, "custom_scalars/layout")
    titles = [category["title"] for category in layout["category"]]
    assert titles[:2] == ["accuracy", "throughput"]
    charts = {chart["title"]: chart["multiline"]["tag"]
              for category in layout["category"] for chart in category["chart"]}
    tags = set(get(server, "scalars/tags")["run"])
    regexes = {regex for chart in charts.values() for regex in chart}
    assert {"^throughput/images_per_sec$", "^throughput/loader_wait_percent$",
            "^train/acc1$", "^accuracy/val_acc1$", "^accuracy/val_acc5$"} <= regexes
    for chart in charts.values():  # every chart draws tags that exist (val loss: from epoch 2)
        assert any(re.search(regex, tag) for regex in chart for tag in tags), chart
    assert charts["loss (train, and val from epoch 2)"] == ["^train/loss$",
                                                             "^val/loss_from_epoch_2$"]


def test_train_log_images_adds_the_first_training_batch_as_a_grid(server: str, compose) -> None:
    assert "train/first_batch" not in get(server, "images/tags").get("run", {})  # default: off
    assert "train/first_batch" in get(server, "images/tags")[RUNS["second"]]
    query = urllib.parse.urlencode({"run": RUNS["second"], "tag": "train/first_batch",
                                    "sample": 0})
    (entry,) = get(server, f"images/images?{query}")  # once per run
    assert entry["step"] == 0
    grid = Image.open(io.BytesIO(get(server, f"images/individualImage?{entry['query']}")))
    # What the network saw: the run's first batch, rebuilt here, in its uint8 colours (a
    # normalised tensor would show clipped to black and white), 32 images 8 a row.
    loaders = build_loaders(resolve(compose(*SHORT), list(SHORT)), World(), accelerator=False)
    loaders.train_sampler.set_epoch(0)
    images, _ = next(iter(loaders.train))
    expected = make_grid(images[:32], nrow=8, padding=2).permute(1, 2, 0).numpy()
    assert grid.size == (8 * 34 + 2, 4 * 34 + 2)
    assert (np.asarray(grid.convert("RGB")) == expected).all()
