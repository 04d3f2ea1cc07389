"""mode=eval over several test sizes in one call (eval.crop_sizes or eval.sizes): one table of
loss, Acc@1 and Acc@5 per (resize, crop), the best named.

A network trained at one resolution is often best tested at a larger one (Touvron et al. 2019,
"FixRes"; torchvision's V2 weights train at 176 and test at 232 -> 224). The parent resolves the
sizes once (`sweep_sizes`, into plan.eval_sizes); the worker evaluates the loaded weights on one
validation loader per size, each built by data.build_loaders from the plan at that size, so a
row is what `mode=eval dataset.val_resize_size=R dataset.val_crop_size=C` gives alone.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imgtrain.data import build_loaders
from imgtrain.data.transforms import val_resize
from imgtrain.errors import ConfigError

if TYPE_CHECKING:
    from imgtrain.config import Config
    from imgtrain.distributed import World
    from imgtrain.plan import RunPlan

SWEEP_KEYS = ("eval.crop_sizes", "eval.sizes")
VAL_KEYS = ("dataset.val_resize_size", "dataset.val_crop_size")


def sweep_sizes(config: Config, given: set[str]) -> tuple[tuple[int, int], ...]:
    """The (resize, crop) pairs of eval.crop_sizes (resize = crop / eval.crop_ratio, rounded as
    dataset.val_crop_size alone gives it) or eval.sizes, checked; () without a sweep. `given`:
    the keys set on the command line."""
    ev = config.eval
    crops, pairs = list(ev.crop_sizes), [list(pair) for pair in ev.sizes]
    if not crops and not pairs:
        return ()
    key = "eval.crop_sizes" if crops else "eval.sizes"
    if crops and pairs:
        raise ConfigError("eval.crop_sizes and eval.sizes both list test sizes; give one of them")
    if config.mode != "eval":
        raise ConfigError(f"{key} sweeps mode=eval's test sizes; mode={config.mode} validates at "
                          "dataset.val_resize_size and val_crop_size")
    if config.dataset.name != "imagenet":
        raise ConfigError(f"{key} applies to dataset=imagenet (an ImageFolder): "
                          f"{config.dataset.name} validates its images at their own size")
    clash = sorted(given & set(VAL_KEYS))
    if clash:
        raise ConfigError(f"{key} sets validation's sizes for each row; drop {clash[0]}")
    if crops:
        if not 0 < ev.crop_ratio <= 1:
            raise ConfigError(f"eval.crop_ratio={ev.crop_ratio} must be in (0, 1]: the crop's "
                              "share of the resized short side (0.875: 224 of 256)")
        pairs = [[val_resize(crop, ev.crop_ratio), crop] for crop in crops]
    sizes = []
    for pair in pairs:
        if len(pair) != 2 or min(pair) < 1 or pair[0] < pair[1]:
            raise ConfigError(f"{key}: {pair if key == 'eval.sizes' else pair[1]} is not a test "
                              "size; eval.sizes takes [resize, crop] pairs of pixels with resize "
                              ">= crop, eval.crop_sizes positive crops")
        if tuple(pair) in sizes:
            raise ConfigError(f"{key} lists resize {pair[0]} crop {pair[1]} twice")
        sizes.append((int(pair[0]), int(pair[1])))
    return tuple(sizes)


def sweep(plan: RunPlan, trainer: Any, world: World, accelerator: bool,
          say: Any) -> list[dict[str, Any]]:
    """Each size's loss, Acc@1, Acc@5 and samples, in plan.eval_sizes' order; `say(line)`
    prints each row as it is done. The trainer's own loader is the first size's."""
    rows = []
    say(f"  {'resize':>6} {'crop':>5} {'loss':>8} {'acc1':>8} {'acc5':>8}")
    with trainer.progress:
        for index, (resize, crop) in enumerate(plan.eval_sizes):
            loader = trainer.loaders.val if index == 0 else build_loaders(
                plan.at_val_sizes(resize, crop), world, accelerator).val
            val = trainer.evaluate(loader=loader)
            del loader  # its workers and shared batches go before the next size's start
            rows.append({"resize": resize, "crop": crop, **val})
            say(f"  {resize:>6} {crop:>5} {val['loss']:8.4f} {val['acc1']:8.3f} "
                f"{val['acc5']:8.3f}")
    return rows


def best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the highest Acc@1; on a tie the higher Acc@5, then the smaller (cheaper)."""
    return max(rows, key=lambda row: (row["acc1"], row["acc5"], -row["crop"], -row["resize"]))


def results(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What results.json adds: every row, and the best row's numbers as the run's."""
    top = best(rows)
    return {"eval_sizes": rows, "best_size": {"resize": top["resize"], "crop": top["crop"]},
            "final_acc1": top["acc1"], "final_acc5": top["acc5"], "best_acc1": top["acc1"],
            "val_samples": top["samples"], "val_loss": top["loss"]}
