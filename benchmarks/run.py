"""Benchmarks: every performance goal of the project, measured side by side in one run, against
this machine's own limits and against the published recipe.

    python -m benchmarks.run            # or: make bench   (45-55 min on 2 cores with bf16, 2 h or more in fp32)
    python -m benchmarks.run --only fixed,floor,profile,peak   # the quick parts (a few minutes)

Parts, in the order they run (``--only`` picks some):

- ``fixed`` (benchmarks/fixed.py): a train stage that trains almost nothing and its evaluate stage,
  fresh processes as ``dvc repro`` runs them (goals: 7 s and 5 s), and the train stage's imports.
- ``floor`` (benchmarks/floor.py): the pipeline's FLOP floor, every stage's counted FLOPs over the
  peak, measured now, of the precision it trains in.
- ``profile`` (benchmarks/step_profile.py): one training step of each conv net, per operator.
- ``peak`` (benchmarks/peak.py): every model's training step against that peak (goals: conv nets
  55%, tinyvgg 35%), and beside each conv net's, its convolutions alone against the same peak.
- ``allocator`` (benchmarks/allocator.py): the conv nets' training steps under the C library's malloc
  and under tcmalloc, fresh processes taking turns (no goal: the lever behind fmnist.allocator).
- ``linear``, ``tinyvgg``: the core against the published recipe written out by hand (goals: 5x and
  2x its throughput, accuracy within 1 point); ``best``: fmnet against the reference tinyvgg's time
  (94% within 1x, 95% within 10x; the mean of three seeds, ``--seeds`` to choose them, ``--schedules``
  to run only the short or the long schedule).
- ``compile``: what torch.compile buys (no goal).
- ``pipeline`` (benchmarks/floor.py): a full ``dvc repro`` in a fresh clone of HEAD, then ``dvc exp
  run -S loss=focal``, each against the floor (goal: 1.5x), and every model's accuracy against the
  committed figure (within 0.2 point).

The reference of ``linear`` and ``tinyvgg`` is the published way of training these models:
``torchvision.datasets.FashionMNIST`` with a per-sample ``ToTensor``, ``DataLoader(batch_size=32,
shuffle=True)``, plain SGD at lr 0.1, cross-entropy, 3 epochs. The core runs the identical recipe
(``recipe: published``: the same settings, pixels / 255 as ToTensor gives them). Every side trains
on the same 60,000 training images and is scored on the 10,000 test images; times cover the training
loop only (no evaluation). One JSON line is printed per comparison, with both sides' figures and
their ratio, after a first line describing the machine; the last line counts the goals missed, each
named with by how much (also on stderr), and the exit status is then 1.
"""
from __future__ import annotations

if __name__ == "__main__":  # as every fmnist command runs: under tcmalloc where the machine has it
    from fmnist import allocator

    allocator.use_tcmalloc()

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from fmnist import allocator, runspec
from fmnist.core import device, engine, losses, models
from fmnist.data import RAW_DIR
from fmnist.data.idx import read_pair
from fmnist.data.loader import Split, Stats, pixel_stats
from fmnist.data.sources import FILES
from fmnist.runspec import RunSpec
from fmnist.stats import summary

SEED = 42
RECIPE = dict(epochs=3, batch_size=32, lr=0.1)  # the published recipe
SAME_RECIPE = ("recipe=published",)  # ... as params.yaml holds it for the core's side
PUBLISHED = {"linear": {"hidden": 10}, "tinyvgg": {"hidden_units": 10}}
GOALS = {"linear": 5.0, "tinyvgg": 2.0}  # throughput ratio, core / reference
# The final iterate of plain SGD at lr 0.1 moves the linear model's test accuracy by a point or
# two from one seed to the next, so both sides are averaged over three seeds. tinyvgg's accuracy moves
# less, but its time moved by up to 30% from one run to the next on a shared machine, and it is also the
# time `best` is measured against: three seeds as well.
SEEDS = {"linear": (42, 43, 44), "tinyvgg": (42, 1, 2)}
BEST_GOALS = ((1.0, 0.940), (10.0, 0.950))  # (time budget in reference-tinyvgg times, test accuracy)
# A goal of `best` is about a recipe, not one seed of it: seed to seed, fmnet's accuracy moves by
# 0.1 to 0.4 point, as far as it is from the goals. So each is judged on the mean of three seeds (and
# its mean time per run), with the 95% t interval of that mean beside it.
BEST_SEEDS = (42, 1, 2)
# Training steps against the peak of the precision they train in, at least: conv nets 55%, tinyvgg (10
# channels, too thin to feed the matmul kernels) 35%.
PEAK_GOALS = {"tinyvgg": 0.35, "fashionnet": 0.55, "cnn_bn": 0.55, "fmnet": 0.55}
PARTS = ("fixed", "floor", "profile", "peak", "allocator", "linear", "tinyvgg", "best", "compile", "pipeline")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"machine": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "isa": cpu_isa(), "bf16_native": device.cpu_has_native_bf16(), "torch": torch.__version__,
            "python": platform.python_version(), "malloc": "tcmalloc" if allocator.preloaded() else "system"}


def cpu_isa() -> str:
    """The vector instructions torch's CPU kernels use here (``AVX2``, ``AVX512``), with ``+AMX`` where
    the CPU has AMX tiles: one model name ("AMD EPYC") covers CPUs whose peaks differ severalfold."""
    isa = torch.backends.cpu.get_cpu_capability()
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return isa + ("+AMX" if probe is not None and probe() else "")


def scratch_repo(work: Path, processed: Path = Path("data/processed")) -> Path:
    """``work`` as a scratch copy of this repository for fmnist's stages: params.yaml and dvc.yaml
    copied, data/processed linked to ``processed``."""
    (work / "data").mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(name, work / name)
    (work / "data" / "processed").symlink_to(processed.resolve())
    return work


def ensure_raw() -> Path:
    raw = Path(RAW_DIR)
    if not all((raw / f.name).is_file() for f in FILES):
        from fmnist.commands import download

        download.run(progress=False)
    return raw


# --------------------------------------------------------------------------- the reference, as published

def reference(arch: str, raw: Path, seed: int = SEED) -> dict:
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import ToTensor

    with tempfile.TemporaryDirectory() as root:  # torchvision's layout: <root>/FashionMNIST/raw/<files>
        (Path(root) / "FashionMNIST").mkdir()
        (Path(root) / "FashionMNIST" / "raw").symlink_to(raw.resolve())
        train_data = datasets.FashionMNIST(root, train=True, download=False, transform=ToTensor())
        test_data = datasets.FashionMNIST(root, train=False, download=False, transform=ToTensor())
    train_dl = DataLoader(train_data, batch_size=RECIPE["batch_size"], shuffle=True)
    test_dl = DataLoader(test_data, batch_size=RECIPE["batch_size"], shuffle=False)

    torch.manual_seed(seed)
    model = models.build(arch, PUBLISHED[arch])
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=RECIPE["lr"])
    train_s = 0.0
    for _ in range(RECIPE["epochs"]):
        model.train()
        t0 = time.perf_counter()
        train_loss, train_acc = 0.0, 0.0
        for X, y in train_dl:
            y_pred = model(X)
            loss = loss_fn(y_pred, y)
            train_loss += loss
            train_acc += (y_pred.argmax(dim=1) == y).sum().item() / len(y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_s += time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.inference_mode():
        for X, y in test_dl:
            correct += (model(X).argmax(dim=1) == y).sum().item()
    n = len(train_data) * RECIPE["epochs"]
    return {"train_s": round(train_s, 2), "images_per_s": round(n / train_s), "test_accuracy": correct / len(test_data)}


# --------------------------------------------------------------------------- the project's core

def load_data(raw: Path) -> tuple[Split, Split, Stats]:
    images, labels = read_pair(raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte")
    train = Split(images, labels, torch.arange(len(labels)))
    images, labels = read_pair(raw / "t10k-images-idx3-ubyte", raw / "t10k-labels-idx1-ubyte")
    test = Split(images, labels, torch.arange(len(labels)))
    return train, test, pixel_stats(train.images)


def core(spec: RunSpec, data: tuple[Split, Split, Stats], seed: int = SEED) -> dict:
    """The training core exactly as the train stage calls it (on all 60,000 training images)."""
    train, test, stats = data
    stats = stats if spec.train.input_scaling == "standard" else Stats(0.0, 1.0)
    tc = spec.train
    engine.seed_everything(seed)
    model = models.build(spec.arch, spec.hparams)
    where = device.place(tc.device, tc.precision, model)
    loss_fn = losses.make_loss(spec.loss, spec.focal, tc.label_smoothing)
    r = engine.fit(model, train, None, stats, tc, loss_fn, seed=seed, device=where.device, bf16=where.bf16)
    acc = engine.evaluate(model, test, stats, batch_size=spec.evaluate.batch_size, device=where.device,
                          bf16=r.bf16, tta_flip=spec.evaluate.tta_flip)["accuracy"]
    return {"train_s": round(r.train_time_s, 2), "images_per_s": round(r.images_per_s), "test_accuracy": acc,
            "epochs": tc.epochs, "bf16": r.bf16}


def same_recipe(arch: str, params: str = "params.yaml") -> RunSpec:
    return runspec.load(params, SAME_RECIPE)[arch]


# fmnet for the reference's own time: no stem conv, its first conv a frozen whitening of the image's
# patches (no gradient to compute for it, and a better start), a narrow first group, 6 epochs, no shift
# augmentation. The same overrides work as `dvc exp run -S ...` (prefix each with -S).
SHORT = ("models.fmnet.widths=[16,48,96]", "models.fmnet.stem=0", "models.fmnet.whiten=true",
         "models.fmnet.train.epochs=6", "models.fmnet.train.lr=0.008", "models.fmnet.train.augment.shift=0")


# fmnet for ten times the reference's time: as params.yaml trains it, three times as long.
LONG = ("models.fmnet.train.epochs=24",)


SCHEDULES = ("short", "long")


def best_configs(params: str, schedules: tuple[str, ...] = SCHEDULES) -> list[tuple[float, float, RunSpec]]:
    """fmnet with SHORT (for the 1x budget), and with LONG (for the 10x budget); ``schedules`` picks."""
    (t1, a1), (t10, a10) = BEST_GOALS
    configs = {"short": (t1, a1, SHORT), "long": (t10, a10, LONG)}
    return [(t, a, runspec.load(params, over)["fmnet"]) for name, (t, a, over) in configs.items() if name in schedules]


def best_line(spec: RunSpec, budget: float, goal: float, runs: list[dict], seeds: list[int], ref: dict) -> dict:
    """fmnet's runs (one per seed) against the reference tinyvgg's (pooled): met when their mean accuracy
    reaches ``goal`` and their mean training time is within ``budget`` times the reference's mean."""
    ours = pooled(runs)
    ratio = ours["mean_train_s"] / ref["mean_train_s"]
    acc = summary(r["test_accuracy"] for r in runs)
    met = ratio <= budget and acc.mean >= goal
    return {"comparison": f"fmnet {spec.hparams} ({spec.train.epochs} epochs, seeds {', '.join(map(str, seeds))}) "
                          "against the reference tinyvgg's training time",
            "reference": ref, "core": ours, "time_ratio": round(ratio, 2),
            **({"test_accuracy_interval": [round(acc.lo, 4), round(acc.hi, 4)]} if len(runs) > 1 else {}),
            "accuracy_delta_points": round(100 * (acc.mean - ref["test_accuracy"]), 2),
            "goal": f">= {100 * goal:.1f}% within {budget:g}x the reference's time", "met": met,
            **({} if met else {"missed_by": {"time_x": round(max(0, ratio - budget), 2),
                                             "points": round(max(0, 100 * (goal - acc.mean)), 2)}})}


def pooled(runs: list[dict]) -> dict:
    """Several seeds as one: total and mean time, overall throughput, mean accuracy (and each seed's)."""
    train_s = sum(r["train_s"] for r in runs)
    out = dict(runs[0], runs=len(runs), mean_train_s=round(train_s / len(runs), 2))
    if len(runs) > 1:
        out.update(train_s=round(train_s, 2),
                   images_per_s=round(sum(r["images_per_s"] * r["train_s"] for r in runs) / train_s),
                   test_accuracy=round(sum(r["test_accuracy"] for r in runs) / len(runs), 4),
                   test_accuracy_per_seed=[r["test_accuracy"] for r in runs])
    return out


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def checked(line: dict, missed: list[str]) -> dict:
    """``line`` emitted; a goal it misses noted in ``missed``, by how much."""
    emit(line)
    if line.get("met") is False:
        by = ", ".join(f"{v:g} {k.replace('_', ' ')}" for k, v in line.get("missed_by", {}).items() if v > 0)
        missed.append(f"{line['comparison']}: goal {line['goal']}, missed by {by}")
    return line


def seed_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers separated by commas, e.g. 42,1,2") from None


def schedule_list(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    if set(names) - set(SCHEDULES):
        raise argparse.ArgumentTypeError(f"{text!r}: give {' and/or '.join(SCHEDULES)}, separated by a comma")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    ap.add_argument("--params", default="params.yaml",
                    help="the params file every part reads its models from (a copy with other settings measures those)")
    ap.add_argument("--seeds", type=seed_list, default=list(BEST_SEEDS),
                    help=f"comma-separated seeds of `best`'s fmnet runs (default {','.join(map(str, BEST_SEEDS))}); "
                    "the reference keeps its own")
    ap.add_argument("--schedules", type=schedule_list, default=SCHEDULES,
                    help="which of `best`'s fmnet schedules to run: short (94%% within 1x), long (95%% within 10x), "
                    "or both (the default); without bf16 in hardware the long one alone takes about an hour on 2 cores")
    args = ap.parse_args(argv)
    parts = set(args.only.split(","))
    if parts - set(PARTS):
        ap.error(f"--only: unknown part(s) {', '.join(sorted(parts - set(PARTS)))}")

    raw = ensure_raw()
    data = load_data(raw)
    emit(machine())
    specs = runspec.load(args.params)
    missed: list[str] = []
    floor_s = None
    if "fixed" in parts:
        from benchmarks import fixed

        processed = Path("data/processed")
        if not (processed / "train.pt").is_file():
            ap.error(f"{processed}/train.pt is missing: run `dvc repro preprocess` (or `make pipeline`) first")
        for line in fixed.fixed_report(processed):
            checked(line, missed)
    if parts & {"floor", "pipeline"}:
        from benchmarks import floor

        lines, floor_s = floor.floor_report(specs)
        for line in lines:
            emit({"part": "floor", **line})
    if "profile" in parts:
        from benchmarks import step_profile

        for line in step_profile.profile_report(specs, data[0], data[2]):
            emit({"part": "profile", **line})
    if "peak" in parts:
        from benchmarks import peak

        for line in peak.peak_report(specs, data[0], data[2]):
            goal = PEAK_GOALS.get(line.get("model"))
            if goal is None:
                emit({"part": "peak", **line})
                continue
            met = line["fraction_of_peak"] >= goal
            # the share of its convolutions' own rate the step would need: above 1, out of reach in this run
            convs = line["convolutions_alone"]["fraction_of_peak"]
            checked({"comparison": f"{line['model']}: training step against the {line['precision']} peak", **line,
                     "goal": f">= {goal:.0%} of the peak", "goal_over_convolutions_alone": round(goal / convs, 2),
                     "met": met,
                     **({} if met else {"missed_by": {"points_of_peak": round(100 * (goal - line["fraction_of_peak"]), 1)}})},
                    missed)
    if "allocator" in parts:
        from benchmarks.allocator import allocator_report

        for line in allocator_report():
            emit(line)
    ref_tinyvgg = None
    for arch in ("linear", "tinyvgg"):
        if arch not in parts and not (arch == "tinyvgg" and "best" in parts):
            continue
        ref = pooled([reference(arch, raw, seed) for seed in SEEDS[arch]])
        if arch == "tinyvgg":
            ref_tinyvgg = ref
        if arch not in parts:
            continue
        ours = pooled([core(same_recipe(arch, args.params), data, seed) for seed in SEEDS[arch]])
        speedup = ours["images_per_s"] / ref["images_per_s"]
        delta = 100 * (ours["test_accuracy"] - ref["test_accuracy"])
        met = speedup >= GOALS[arch] and delta >= -1.0
        checked({"comparison": f"{arch}, same recipe (batch 32, SGD 0.1, 3 epochs)", "reference": ref, "core": ours,
              "throughput_ratio": round(speedup, 2), "accuracy_delta_points": round(delta, 2),
              "goal": f"throughput >= {GOALS[arch]:g}x, accuracy within 1 point", "met": met,
              **({} if met else {"missed_by": {"throughput_x": round(max(0, GOALS[arch] - speedup), 2),
                                               "points": round(max(0, -1.0 - delta), 2)}})}, missed)
    if "best" in parts:
        for budget, goal, m in best_configs(args.params, args.schedules):
            runs = [core(m, data, seed) for seed in args.seeds]
            checked(best_line(m, budget, goal, runs, args.seeds, ref_tinyvgg), missed)
    if "compile" in parts:
        from benchmarks import peak

        for line in peak.compile_report(specs):
            emit({"part": "compile", **line})
    if "pipeline" in parts:
        for line in floor.pipeline_report(floor_s, list(specs)):
            checked(line, missed)
    emit({"goals_missed": len(missed), "missed": missed})
    for m in missed:
        print(f"goal missed: {m}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
