"""The benchmark's own logic (the measurements themselves run with `make bench`, not here)."""

import pytest
import torch
from torchvision.transforms import ToTensor

from benchmarks import run as bench
from conftest import specs
from fmnist import config
from fmnist.data.loader import normalize, to_float


def test_best_configurations_are_a_short_schedule_and_params_yaml():
    (b1, a1, short), (b5, a5, long) = bench.best_configs("params.yaml")
    assert (b1, a1, b5, a5) == (1.0, 0.93, 5.0, 0.94)
    assert long == specs()["fmnet"]
    assert short.hparams == {"widths": [16, 32, 64], "stem": 0}
    assert (short.train.epochs, short.train.lr, short.train.augment.shift) == (6, 0.008, 0)
    assert short.evaluate.tta_flip and short.train.augment.flip  # the rest as params.yaml has it


def test_same_recipe_is_the_published_one():
    for arch, hparams in bench.PUBLISHED.items():
        spec = bench.same_recipe(arch)
        tc = spec.train
        assert (tc.epochs, tc.batch_size, tc.optimizer, tc.lr, tc.momentum, tc.weight_decay, tc.schedule) == (
            3, 32, "sgd", 0.1, 0.0, 0.0, "none")
        assert tc.augment == config.AugmentConfig() and tc.label_smoothing == 0 and spec.loss == "ce"
        assert spec.hparams == hparams and not spec.evaluate.tta_flip


def test_same_recipe_inputs_are_what_totensor_gives_the_reference():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    ours = normalize(to_float(images, "cpu"), bench.RECIPE_STATS)
    theirs = torch.stack([ToTensor()(img.numpy()) for img in images])
    torch.testing.assert_close(ours, theirs)


def test_seeds_pool_into_total_time_overall_throughput_and_mean_accuracy():
    runs = [{"train_s": 2.0, "images_per_s": 1000, "test_accuracy": 0.80},
            {"train_s": 6.0, "images_per_s": 3000, "test_accuracy": 0.84}]
    p = bench.pooled(runs)
    assert p["train_s"] == 8.0 and p["images_per_s"] == 2500 and p["test_accuracy"] == 0.82
    assert p["test_accuracy_per_seed"] == [0.80, 0.84]
    assert bench.pooled(runs[:1]) == runs[0]


def test_unknown_part_is_refused():
    with pytest.raises(SystemExit):
        bench.main(["--only", "resnet"])
