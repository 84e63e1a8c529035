"""The ``fmnist`` command: parses the command line and calls the command's module (commands/).

Heavy libraries (torch, mlflow) are imported by the stage that needs them, so
``fmnist --help`` answers at once.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys

from fmnist import FmnistError, __version__


def _specs(args: argparse.Namespace):
    """Every model's run spec from --params and --set: the whole file is checked before any work."""
    from fmnist import runspec

    return runspec.load(args.params, getattr(args, "set", None) or ())


def _download(args: argparse.Namespace) -> None:
    from fmnist.commands import download

    for path in download.run(args.source, progress=not args.no_progress):
        print(path)


def _preprocess(args: argparse.Namespace) -> None:
    from fmnist import config, runspec
    from fmnist.commands import preprocess

    params = config.load(args.params)
    runspec.resolve(params)  # every model checked too, so a bad params.yaml stops the first stage
    summary = preprocess.run(params)
    print(", ".join(f"{name}: {s['count']:,}" for name, s in summary.items()))


def _train(args: argparse.Namespace) -> None:
    import json

    from fmnist import runspec
    from fmnist.commands import train
    from fmnist.core import distributed

    spec = runspec.pick(_specs(args), args.model)
    nproc = args.nproc if args.nproc is not None else spec.train.nproc
    if nproc != 1 and not distributed.launched():  # torchrun runs this same command in each of nproc processes
        worker = [a for i, a in enumerate(args.argv)  # less --nproc N, which torchrun would take for its own
                  if not a.startswith("--nproc") and (i == 0 or args.argv[i - 1] != "--nproc")]
        train.launch(spec, nproc, worker, force=args.force, backend=args.backend)
        return
    metrics = train.run(spec, resume=train.resume_requested(args.resume), progress=not args.no_progress,
                        backend=args.backend)
    if metrics is not None:
        print(json.dumps(metrics, indent=2))


def _evaluate(args: argparse.Namespace) -> None:
    import json

    from fmnist import runspec
    from fmnist.commands import evaluate

    print(json.dumps(evaluate.run(runspec.pick(_specs(args), args.model)), indent=2))


def _report(args: argparse.Namespace) -> None:
    from fmnist.commands import report

    print(report.run(_specs(args)))


def _register(args: argparse.Namespace) -> None:
    import json

    from fmnist.commands import register

    print(json.dumps(register.run(_specs(args)), indent=2))


def _predict(args: argparse.Namespace) -> None:
    from fmnist.commands import predict

    predict.main(args.model, args.images, test_index=args.test_index, as_json=args.json)


def _compare(args: argparse.Namespace) -> None:
    from fmnist.commands import compare

    if args.mcnemar:
        compare.mcnemar(*args.mcnemar)
    else:
        compare.main(experiment=args.experiment, tags=args.tag or (), out=args.out, params=args.params,
                     versus_models=args.versus)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fmnist", description="Fashion-MNIST pipeline: every DVC stage is a subcommand.")
    p.add_argument("--version", action="version", version=f"fmnist {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str, params: bool = True) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, description=help)
        if params:
            s.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        s.set_defaults(func=func)
        return s

    s = add("download", _download, "fetch and verify the four Fashion-MNIST files into data/raw/", params=False)
    s.add_argument("--source", help="a folder or base URL holding the files (default: $FMNIST_SOURCE, "
                                    "then a local copy, then the official mirrors)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")

    add("preprocess", _preprocess, "split, check and tensorise data/raw/ into data/processed/")

    for name, func, text in (("train", _train, "train one model of params.yaml's `models:`"),
                             ("evaluate", _evaluate, "score one trained model on the test set")):
        s = add(name, func, text)
        s.add_argument("model", help="a key of params.yaml's `models:`")
        s.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a param with `dvc exp run -S`'s grammar (repeatable), e.g. --set train.lr=0.01; "
                            "+key=value adds a key; sweeps need `dvc exp run --queue -S`")
        if name == "train":
            s.add_argument("--resume", action="store_true",
                           help="continue from .fmnist/resume/MODEL.pt (under dvc repro: FMNIST_RESUME=1)")
            s.add_argument("--no-progress", action="store_true", help="no progress bars")
            s.add_argument("--nproc", type=int, metavar="N",
                           help="train with N processes (torchrun, DistributedDataParallel); default: train.nproc")
            s.add_argument("--force", action="store_true", help="allow --nproc above the cores or GPUs there are")
            s.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                           help="torch.distributed backend (default: gloo on the CPU, nccl on CUDA)")

    add("report", _report, "write reports/report.md and reports/figures/ from every model's results")
    add("register", _register, "register the best model (on validation) in MLflow, as @champion if it beats "
                               "the current one; write reports/champion.json")

    s = add("predict", _predict, "classify images with a trained model: class name and top-3 probabilities",
            params=False)
    s.add_argument("model", help="a checkpoint file (models/fmnet.pt) or a model of params.yaml (fmnet)")
    s.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files; any size or colour is converted to a 28x28 light-on-dark image")
    s.add_argument("--test-index", type=int, metavar="N",
                   help="also classify image N of the test split (data/processed/test.pt), with its true label")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")

    s = add("compare", _compare, "cross-entropy against focal loss over seeds, with confidence intervals, from the "
                                 "MLflow runs (markdown and PNGs)")
    s.add_argument("--experiment", help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME or fashion-mnist)")
    s.add_argument("--tag", action="append", metavar="KEY=VALUE",
                   help="only runs with this tag (repeatable), e.g. --tag dvc_exp_name=my-exp")
    s.add_argument("--out", default="reports", help="folder for compare.md and the PNGs (default: reports)")
    s.add_argument("--versus", nargs=2, metavar=("A", "B"),
                   help="also: model A minus model B, paired by seed, for each loss and recipe both have")
    s.add_argument("--mcnemar", nargs=2, metavar=("A", "B"),
                   help="instead: McNemar's exact test of two models on the same test images (A, B: model names, "
                        "for reports/eval/MODEL/predictions.csv, or paths to predictions.csv files); no MLflow")
    return p


def _interrupt(signum, frame):  # SIGTERM behaves like Ctrl-C: runs end KILLED, temp files go
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        args.func(args)
    except FmnistError as e:
        print(f"fmnist {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"fmnist {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return 0


# A stage imports torch, MLflow and SQLAlchemy: over a million Python objects, none of them garbage.
# At its default thresholds (700, 10, 10) CPython's cyclic collector walks all of them again several
# times while they load, and once more while the process exits; about 2 s of a stage that trains
# for one second (`python -m benchmarks.run --only fixed`). Reference counting still frees every
# object at once; only the search for unreachable cycles runs less often.
GC_THRESHOLDS = (50_000, 20, 100)


def console() -> int:
    """The ``fmnist`` command as a process of its own (the console script, ``python -m fmnist``):
    ``main`` with the collector set for a short-lived process, and what is left at the end frozen out
    of the collections of the interpreter's exit, under tcmalloc where the machine has it
    (fmnist.allocator). ``main`` itself, called in a process that goes on (the tests), changes none
    of these."""
    from fmnist import allocator

    allocator.use_tcmalloc()  # first: it starts the process again
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        return main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    sys.exit(console())
