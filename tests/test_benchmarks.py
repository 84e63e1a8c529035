"""The benchmark's own logic (the measurements themselves run with `make bench`, not here)."""

import pytest
import torch
from torchvision.transforms import ToTensor

from benchmarks import run as bench
from conftest import specs
from fmnist import config
from fmnist.data.loader import normalize, to_float


def test_best_configurations_are_a_short_schedule_and_a_long_one():
    (b1, a1, short), (b10, a10, long) = bench.best_configs("params.yaml")
    assert (b1, a1, b10, a10) == (1.0, 0.94, 10.0, 0.95)
    assert long == specs("models.fmnet.train.epochs=24")["fmnet"]  # all else as params.yaml has it
    assert short.hparams == {"widths": [16, 48, 96], "stem": 0, "whiten": True}
    assert (short.train.epochs, short.train.lr, short.train.augment.shift) == (6, 0.008, 0)
    assert short.evaluate.tta_flip and short.train.augment.flip  # the rest as params.yaml has it


def test_same_recipe_is_the_published_one():
    for arch, hparams in bench.PUBLISHED.items():
        spec = bench.same_recipe(arch)
        tc = spec.train
        assert (tc.epochs, tc.batch_size, tc.optimizer, tc.lr, tc.momentum, tc.weight_decay, tc.schedule) == (
            3, 32, "sgd", 0.1, 0.0, 0.0, "none")
        assert tc.augment == config.AugmentConfig(flip=False, shift=0, erase=0.0) and tc.label_smoothing == 0 and spec.loss == "ce"
        assert spec.hparams == hparams and not spec.evaluate.tta_flip


def test_same_recipe_inputs_are_what_totensor_gives_the_reference():
    from fmnist.data.loader import input_stats

    assert bench.same_recipe("tinyvgg").train.input_scaling == "unit"
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    ours = normalize(to_float(images, "cpu"), input_stats("unit"))
    theirs = torch.stack([ToTensor()(img.numpy()) for img in images])
    torch.testing.assert_close(ours, theirs)


def test_seeds_pool_into_total_time_overall_throughput_and_mean_accuracy():
    runs = [{"train_s": 2.0, "images_per_s": 1000, "test_accuracy": 0.80},
            {"train_s": 6.0, "images_per_s": 3000, "test_accuracy": 0.84}]
    p = bench.pooled(runs)
    assert p["train_s"] == 8.0 and p["images_per_s"] == 2500 and p["test_accuracy"] == 0.82
    assert p["test_accuracy_per_seed"] == [0.80, 0.84] and (p["runs"], p["mean_train_s"]) == (2, 4.0)
    assert bench.pooled(runs[:1]) == dict(runs[0], runs=1, mean_train_s=2.0)


def test_best_is_judged_on_the_mean_of_its_seeds_with_its_interval():
    (_, _, short), _ = bench.best_configs("params.yaml")
    ref = bench.pooled([{"train_s": t, "images_per_s": 4500, "test_accuracy": 0.876} for t in (38.0, 42.0)])  # 40 s each
    runs = [{"train_s": t, "images_per_s": 11000, "test_accuracy": a} for t, a in ((36.0, 0.943), (38.0, 0.939), (40.0, 0.941))]
    line = bench.best_line(short, 1.0, 0.94, runs, [42, 1, 2], ref)
    assert line["met"] and "missed_by" not in line  # 94.1% on average, though one seed is under 94%
    assert line["core"]["mean_train_s"] == 38.0 and line["time_ratio"] == 0.95
    lo, hi = line["test_accuracy_interval"]
    assert lo < 0.941 < hi and hi - lo == pytest.approx(2 * 4.303 * 0.002 / 3 ** 0.5, abs=1e-4)
    assert "seeds 42, 1, 2" in line["comparison"]

    slow = bench.best_line(short, 1.0, 0.94, [dict(r, train_s=44.0) for r in runs], [42, 1, 2], ref)
    assert not slow["met"] and slow["missed_by"] == {"time_x": 0.1, "points": 0}
    one = bench.best_line(short, 1.0, 0.94, runs[1:2], [1], ref)  # one seed: no interval, 93.9% misses
    assert not one["met"] and one["missed_by"]["points"] == pytest.approx(0.1) and "test_accuracy_interval" not in one


def test_seeds_must_be_integers():
    assert bench.seed_list("42,1,2") == [42, 1, 2]
    with pytest.raises(SystemExit):
        bench.main(["--only", "best", "--seeds", "42,one"])


def test_schedules_pick_the_short_or_the_long_one():
    assert bench.schedule_list("long") == ("long",) and bench.schedule_list("short,long") == ("short", "long")
    [(budget, goal, short)] = bench.best_configs("params.yaml", ("short",))
    assert (budget, goal, short.train.epochs) == (1.0, 0.94, 6)
    with pytest.raises(SystemExit):
        bench.main(["--only", "best", "--schedules", "medium"])


def test_machine_line_names_the_instruction_set_and_amx(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert bench.cpu_isa() == "AVX512+AMX"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert bench.cpu_isa() == "AVX512"
    assert bench.machine()["isa"] == "AVX512"


def test_unknown_part_is_refused():
    with pytest.raises(SystemExit):
        bench.main(["--only", "resnet"])


def test_peak_counts_flops_and_measures_a_training_step():
    from benchmarks import peak
    from fmnist.data.loader import Split, Stats

    spec = specs()["linear"]
    flops = peak.flops_per_image(spec)
    # forward 2 x (784*10 + 10*10); backward: the weight gradients of both layers, and the input
    # gradient of the second only (the images need none)
    assert flops == 2 * (784 * 10 + 10 * 10) + 2 * 784 * 10 + 2 * 2 * 10 * 10
    train = Split(torch.randint(0, 256, (512, 28, 28), dtype=torch.uint8), torch.arange(512) % 10, torch.arange(512))
    ips, bf16 = peak.training_throughput(spec, train, Stats(0.3, 0.3))
    assert ips > 0 and bf16 is False


def test_convolutions_alone_count_every_conv_flop_of_the_step_and_nothing_else():
    from benchmarks import peak

    spec = specs("train.batch_size=8")["tinyvgg"]
    flops, seconds = peak.convolutions_alone(spec, bf16=False, repeat=1)
    linear = 3 * 2 * 490 * 10  # the classifier, 490 -> 10: forward, its weight and its input gradients
    assert flops == 8 * (peak.flops_per_image(spec) - linear) and seconds > 0
    assert peak.convolutions_alone(specs()["mlp512"], bf16=False) is None  # no conv layer
    # the frozen whitening conv on the image runs forward only, as in the step
    whitened = specs(*bench.SHORT, "train.batch_size=8", "models.fmnet.train.batch_size=8")["fmnet"]
    head = 3 * 2 * 96 * 10
    assert peak.convolutions_alone(whitened, bf16=False, repeat=1)[0] == 8 * (peak.flops_per_image(whitened) - head)


def test_model_logging_times_the_additions_in_the_stage_or_switches_them_all_off(repo, restore_sigterm):
    from mlflow import MlflowClient

    from benchmarks import model_logging
    from fmnist.tracking import registry, runs

    sets = [a for s in ("train.subset=300", "train.epochs=1", "train.batch_size=50") for a in ("--set", s)]
    rc, times = model_logging.stage("linear", sets, without=False)
    assert rc == 0 and set(times) == {"log_model_s", "lineage_s", "system_metrics_s"}
    assert all(t > 0 for t in times.values())
    rc, switched_off = model_logging.stage("linear", sets, without=True)
    assert rc == 0 and switched_off == {}
    assert registry.log_model.__module__ == registry.__name__ and runs.Run.log_input.__qualname__ == "Run.log_input"

    c = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = c.get_experiment_by_name("fashion-mnist").experiment_id
    with_all, reference = sorted(c.search_runs([exp]), key=lambda r: r.info.start_time)
    for run, logged in ((with_all, True), (reference, False)):
        assert run.info.status == "FINISHED" and "test_accuracy" not in run.data.metrics
        models = run.outputs.model_outputs if run.outputs else []
        assert (len(models), len(run.inputs.dataset_inputs)) == ((1, 2) if logged else (0, 0))


def test_floor_counts_what_the_train_and_evaluate_stages_compute():
    from benchmarks import floor

    spec = specs()["linear"]
    fwd = 2 * (784 * 10 + 10 * 10)
    assert floor.forward_flops(spec) == fwd
    from benchmarks import peak

    fwd_bwd = peak.flops_per_image(spec)
    assert floor.images(spec) == (54_000, 6_000)  # val_fraction 0.1 of the 60,000 training images
    flops = floor.stage_flops(spec)
    assert flops["train"] == spec.train.epochs * (54_000 * fwd_bwd + 6_000 * fwd) + 6_000 * fwd
    assert flops["evaluate"] == (10_000 + 6_000) * fwd
    fmnet = specs()["fmnet"]
    assert fmnet.evaluate.tta_flip  # flip test-time augmentation: every evaluation image twice
    assert floor.stage_flops(fmnet)["evaluate"] == pytest.approx(2 * 16_000 * floor.forward_flops(fmnet))
    small = specs("train.subset=3000")["linear"]
    assert floor.images(small) == (3_000, 6_000)


def test_import_costs_are_summed_per_top_level_package():
    from benchmarks import fixed

    stderr = "\n".join([
        "import time: self [us] | cumulative | imported package",
        "import time:       100 |        100 | _io",
        "import time:      2000 |       2000 |     torch._C",
        "import time:       500 |    3000000 | torch",
        "import time:       300 |     500000 |   mlflow.utils",
        "import time:       200 |    1500000 | mlflow",
        "import time:       100 |     250000 | mlflow.pytorch",
        "INFO: something else the stage printed",
    ])
    total, ranked = fixed.import_costs(stderr)
    assert total == pytest.approx(4.7501)  # first-level imports only: their cumulative time holds the rest
    assert ranked == [("torch", 3.0), ("mlflow", pytest.approx(1.75)), ("_io", 0.0001)]


def test_a_missed_goal_is_named_with_by_how_much(capsys):
    missed = []
    bench.checked({"comparison": "fixed cost: train", "goal": "<= 7 s", "met": False,
                   "missed_by": {"seconds": 4.8}}, missed)
    bench.checked({"comparison": "fixed cost: evaluate", "goal": "<= 5 s", "met": True}, missed)
    bench.checked({"part": "floor", "floor_s": 300.0}, missed)
    bench.checked({"comparison": "fmnet", "goal": ">= 94% within 1x", "met": False,
                   "missed_by": {"time_x": 0, "points": 1.03}}, missed)  # on time, short of accuracy
    assert missed == ["fixed cost: train: goal <= 7 s, missed by 4.8 seconds",
                      "fmnet: goal >= 94% within 1x, missed by 1.03 points"]
    assert len(capsys.readouterr().out.splitlines()) == 4  # every line printed, met or not


def test_step_profile_ranks_a_conv_nets_operators():
    from benchmarks import step_profile
    from fmnist.data.loader import Split, Stats

    spec = specs("train.batch_size=32")["tinyvgg"]
    train = Split(torch.randint(0, 256, (512, 28, 28), dtype=torch.uint8), torch.arange(512) % 10, torch.arange(512))
    row = step_profile.profile_step(spec, train, Stats(0.3, 0.3), top=5)
    assert row["model"] == "tinyvgg" and row["batch_size"] == 32 and row["step_ms"] > 0
    shares = [op["share"] for op in row["operators"]]
    assert len(shares) == 5 and shares == sorted(shares, reverse=True) and sum(shares) <= 1.0
    assert any("conv" in op["op"] for op in row["operators"])


def test_torch_masks_put_nn_dropout_where_the_core_has_its_own():
    from benchmarks import levers
    from fmnist.core import models

    model = levers._with_torch_masks(models.build("fashionnet"))
    assert [(type(m), m.p) for m in model if isinstance(m, torch.nn.Dropout)] == [(torch.nn.Dropout, 0.25),
                                                                                    (torch.nn.Dropout, 0.5)]


def test_torch_flatten_puts_nn_flatten_where_the_core_has_its_own():
    from benchmarks import levers
    from fmnist.core import models

    model = levers._with_torch_flatten(models.build("cnn_bn"))
    assert [type(m) for m in model.modules() if isinstance(m, torch.nn.Flatten)] == [torch.nn.Flatten]


def test_levers_measure_each_variant_against_the_step_as_trained():
    from benchmarks import levers
    from fmnist.data.loader import Split, Stats

    spec = specs("train.batch_size=16")["fashionnet"]
    train = Split(torch.randint(0, 256, (256, 28, 28), dtype=torch.uint8), torch.arange(256) % 10, torch.arange(256))
    model = levers._without_dropout(torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Sequential(torch.nn.Dropout2d(0.25))))
    assert all(isinstance(m, torch.nn.Identity) for m in (model[0], model[1][0]))
    threads = torch.get_num_threads()
    chosen = ("as trained", "AdamW fused", "1 thread", "batch x2", "torch masks", "torch Flatten")
    row = levers.measure(spec, train, Stats(0.3, 0.3), chosen)
    assert row["ratio"]["as trained"] == 1.0 and set(row["images_per_s"]) == set(chosen)
    assert all(v > 0 for v in row["images_per_s"].values())
    assert torch.get_num_threads() == threads  # the settings a variant changes are put back
