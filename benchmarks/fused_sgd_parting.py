"""Where torch's fused SGD and the plain loop part on the CPU (#26.9), in two measurements.

1. The kernels alone: one step of each from the same weights, gradients and momentum, on a
   tensor of 4096 + 10 elements: the vectorised body (the first 4096) and the scalar tail (the
   last 10, as a 10-class fc.bias is all tail), with torch's defaults and with nesterov,
   dampening, maximize and non-finite gradients.
2. Two real Trainers (built as the worker builds them), optim.fused=true and false, from the same
   weights over the same batches of fused_sgd.py's shapes folder (made there first): the first
   step where the momentum buffers, the stepped weights (O2: the fp32 masters), the weights the
   forward uses and the loss differ.

usage: python benchmarks/fused_sgd_parting.py [--amp O0|O2] [--steps 60] [--data DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def one_step(p, g, b, fused: bool, **options):
    p = p.clone().requires_grad_()
    p.grad = g.clone()
    optimizer = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=1e-4,
                                fused=fused or None, **options)
    optimizer.state[p]["momentum_buffer"] = b.clone()
    optimizer.step()
    return p.detach(), optimizer.state[p]["momentum_buffer"]


def kernels(trials: int = 50) -> None:
    generator = torch.Generator().manual_seed(3)
    for name, options in [("defaults", {}), ("nesterov", {"nesterov": True}),
                          ("dampening 0.1", {"dampening": 0.1}),
                          ("maximize", {"maximize": True}), ("non-finite grads", {})]:
        counts = [0, 0, 0, 0]  # body buffer, body weight, tail buffer, tail weight
        for _ in range(trials):
            scale = torch.tensor([0.05, 0.02, 0.02])[:, None]
            p, g, b = torch.randn(3, 4096 + 10, generator=generator) * scale
            if name == "non-finite grads":
                g[::97], g[5::89] = float("inf"), float("nan")
            (pf, bf), (pp, bp) = one_step(p, g, b, True, **options), one_step(p, g, b, False,
                                                                                **options)
            for i, (x, y) in enumerate([(bf, bp), (pf, pp)]):
                differ = (x != y) & ~(x.isnan() & y.isnan())
                counts[i] += int(differ[:4096].sum())
                counts[2 + i] += int(differ[4096:].sum())
        print(f"{name:17s} body: {counts[0]} buffer, {counts[1]} weight elements of "
              f"{trials * 4096} differ; tail: {counts[2]} buffer, {counts[3]} weight of "
              f"{trials * 10}")


def trainer(amp: str, fused: bool, data: Path):
    from hydra import compose, initialize_config_dir

    from imgtrain.assembly import build_trainer
    from imgtrain.device import DeviceInfo
    from imgtrain.resolve import resolve

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "device=cpu", f"amp={amp}", "dataset=imagenet", f"dataset.root={data}",
            "dataset.image_size=32", "dataset.workers=0", "model=resnet18",
            "train.batch_size=64", "optim.lr=0.1", "sched.warmup_epochs=1", "train.epochs=10",
            "train.seed=1", f"optim.fused={str(fused).lower()}", "train.resume=null"])
    plan = resolve(cfg, [])
    torch.manual_seed(1)
    return build_trainer(plan, Path("/tmp"), device=DeviceInfo("cpu"))


def parting(amp: str, steps: int, data: Path) -> dict[str, tuple[int, str]]:
    fused, plain = trainer(amp, True, data), trainer(amp, False, data)
    names = [name for name, _ in fused.model.named_parameters()]
    first: dict[str, tuple[int, str]] = {}
    fused.loaders.train_sampler.set_epoch(0)
    batches = list(fused.loaders.train)
    for step in range(1, steps + 1):
        batch = (batches[(step - 1) % len(batches)],)
        loss_f, loss_p = fused._train_step(batch, epoch=0)[0], plain._train_step(batch, 0)[0]
        stepped = [[p for g in t.optimizer.param_groups for p in g["params"]]
                   for t in (fused, plain)]
        for name, x, y in zip(names, *stepped):
            bx, by = (t.optimizer.state[p]["momentum_buffer"] for t, p in ((fused, x),
                                                                           (plain, y)))
            if not torch.equal(bx, by):
                first.setdefault("buffer", (step, f"{name} ({x.numel() % 16} of its "
                                 f"{x.numel()} elements in the tail): {int((bx != by).sum())}"))
            if not torch.equal(x, y):
                first.setdefault("stepped weight", (step, f"{name}: {int((x != y).sum())}, "
                                 f"by {float((x - y).detach().abs().max()):.3g}"))
        for (name, x), (_, y) in zip(fused.model.named_parameters(),
                                     plain.model.named_parameters()):
            if not torch.equal(x, y):
                first.setdefault("forward weight", (step, f"{name}: {int((x != y).sum())}"))
        if loss_f.item() != loss_p.item():
            first.setdefault("loss", (step, f"{loss_f.item():.6f} vs {loss_p.item():.6f}"))
        if len(first) == 4:
            break
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amp", default="O2", choices=["O0", "O2"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--data", type=Path, default=Path("outputs/fused_sgd/shapes"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    kernels()
    sys.path.insert(0, str(REPO / "benchmarks"))
    from fused_sgd import make_dataset
    data = make_dataset(args.data.resolve(), per_class=128, val_per_class=50)
    first = parting(args.amp, args.steps, data)
    print(f"amp={args.amp}, {args.steps} steps: the first step where each differs")
    for what in ("buffer", "stepped weight", "forward weight", "loss"):
        step, detail = first.get(what, (None, "never"))
        print(f"  {what:15s} {'-' if step is None else step:>4}  {detail}")


if __name__ == "__main__":
    main()
