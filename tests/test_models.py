"""The architecture registry: every entry maps (N, 1, 28, 28) to (N, 10), each published model has
the layers the issue describes, the registry refuses what it does not know, and a checkpoint
rebuilds any of them from the file alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fmnist import ConfigError, checkpoint
from fmnist.core import models
from fmnist.data import CLASSES
from fmnist.data.loader import Stats

from conftest import REPO, make_spec, specs


def layers(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def kinds(model: nn.Module) -> list[str]:
    """The leaf modules in forward order, by class name."""
    return [type(m).__name__ for m in model.modules() if not list(m.children())]


@pytest.mark.parametrize("arch", sorted(models.REGISTRY))
def test_every_entry_maps_images_to_10_scores(arch):
    torch.manual_seed(0)
    model = models.build(arch)
    x = torch.randn(3, 1, 28, 28)
    model.train()
    out = model(x)
    assert out.shape == (3, 10) and out.dtype == torch.float32
    out.sum().backward()  # every parameter takes part
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert model(x[:1]).shape == (1, 10)  # a single image works in eval mode, batch norm included


def test_every_model_in_params_yaml_builds():
    for spec in specs(params=REPO / "params.yaml").values():
        assert models.build(spec.arch, spec.hparams).eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_logistic_is_model_0_one_linear_layer():
    model = models.build("logistic")
    assert kinds(model) == ["Flatten", "Linear"] and models.count_parameters(model) == 7850


def test_linear_is_two_linear_layers_without_activation():
    model = models.build("linear", {"hidden": 7})
    assert kinds(model) == ["Flatten", "Linear", "Linear"]
    a, b = layers(model, nn.Linear)
    assert (a.in_features, a.out_features, b.in_features, b.out_features) == (784, 7, 7, 10)


def test_mlp_keeps_the_published_final_relu():
    model = models.build("mlp", {"hidden": 7})
    assert kinds(model) == ["Flatten", "Linear", "ReLU", "Linear", "ReLU"]
    assert [(m.in_features, m.out_features) for m in layers(model, nn.Linear)] == [(784, 7), (7, 10)]
    assert (model(torch.randn(16, 1, 28, 28)) >= 0).all()


def test_mlp512():
    model = models.build("mlp512")
    assert kinds(model) == ["Flatten", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [(m.in_features, m.out_features) for m in layers(model, nn.Linear)] == [(784, 512), (512, 512), (512, 10)]


@pytest.mark.parametrize("h", [10, 4])
def test_tinyvgg_matches_the_published_model(h):
    model = models.build("tinyvgg", {"hidden_units": h})
    block = ["Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d"]
    assert kinds(model) == block + block + ["Flatten", "Linear"]
    convs = layers(model, nn.Conv2d)
    assert all(c.kernel_size == (3, 3) and c.out_channels == h for c in convs)
    assert [c.in_channels for c in convs] == [1, h, h, h]
    assert all(p.kernel_size == 2 for p in layers(model, nn.MaxPool2d))
    fc = layers(model, nn.Linear)[0]
    assert (fc.in_features, fc.out_features) == (h * 7 * 7, 10)
    expected = (9 * h + h) + 3 * (9 * h * h + h) + (h * 49 * 10 + 10)
    assert models.count_parameters(model) == expected
    if h == 10:
        assert expected == 7_740  # the published TinyVGG's count


def test_fashionnet_outputs_log_probabilities():
    model = models.build("fashionnet").eval()
    assert len(layers(model, nn.Conv2d)) == 2 and len(layers(model, nn.Linear)) == 2
    assert layers(model, nn.MaxPool2d)
    assert sorted(d.p for d in layers(model, nn.Dropout)) == [0.25, 0.5]
    assert kinds(model)[-1] == "LogSoftmax"
    out = model(torch.randn(5, 1, 28, 28))
    assert (out <= 0).all()
    torch.testing.assert_close(out.exp().sum(1), torch.ones(5))


def test_ffn_bn_five_layers_bn_relu_dropout_after_each_but_the_last():
    model = models.build("ffn_bn", {"widths": [64, 32, 16, 8], "dropout": 0.1})
    fcs = layers(model, nn.Linear)
    assert [(m.in_features, m.out_features) for m in fcs] == [(784, 64), (64, 32), (32, 16), (16, 8), (8, 10)]
    assert kinds(model) == ["Flatten"] + ["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 4 + ["Linear"]
    assert [b.num_features for b in layers(model, nn.BatchNorm1d)] == [64, 32, 16, 8]
    assert all(d.p == 0.1 for d in layers(model, nn.Dropout))
    default = [m.out_features for m in layers(models.build("ffn_bn"), nn.Linear)]
    assert default == sorted(default, reverse=True) and len(default) == 5  # decreasing width


def test_cnn_bn_three_convs_with_bn_and_pooling_three_fc_dropout():
    model = models.build("cnn_bn", {"channels": [4, 8, 16], "fc": [32, 16], "dropout": 0.4})
    convs, bns = layers(model, nn.Conv2d), layers(model, nn.BatchNorm2d)
    assert [c.out_channels for c in convs] == [4, 8, 16] and [b.num_features for b in bns] == [4, 8, 16]
    assert len(layers(model, nn.MaxPool2d)) == 3
    assert [(m.in_features, m.out_features) for m in layers(model, nn.Linear)] == [(16 * 3 * 3, 32), (32, 16), (16, 10)]
    assert [d.p for d in layers(model, nn.Dropout)] == [0.4, 0.4]
    assert kinds(model)[-1] == "Linear"


@pytest.mark.parametrize("arch", ["fashionnet", "ffn_bn", "cnn_bn"])
def test_the_seed_models_dropout_is_the_cores(arch):
    dropouts = layers(models.build(arch), nn.Dropout)
    assert dropouts and all(type(d) is models.Dropout for d in dropouts)


def test_dropout_drops_with_its_probability_scales_what_it_keeps_and_passes_the_gradient_alike():
    layer = models.Dropout(0.25)
    torch.manual_seed(0)
    x = torch.ones(64, 32, 12, 12, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    kept = y != 0
    assert y.dtype == torch.bfloat16 and torch.all(y[kept] == 1 / 0.75)
    assert abs(kept.float().mean().item() - 0.75) < 0.005  # 294,912 elements: 4 standard deviations
    assert not torch.equal(kept, layer(x) != 0)  # a fresh mask every call
    torch.manual_seed(0)
    assert torch.equal(kept, layer(x) != 0)  # drawn from torch's generator: a seed repeats it
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient passes the kept elements, scaled alike
    assert torch.equal(layer.eval()(x), x)
    for p in (0.0, 1.0):  # the edges are nn.Dropout's own
        assert torch.equal(models.Dropout(p)(x), x * (1 - p))


@pytest.mark.parametrize("arch", ["tinyvgg", "fashionnet", "cnn_bn", "fmnet"])
def test_the_conv_nets_flatten_is_the_cores(arch):
    assert [type(m) for m in layers(models.build(arch), nn.Flatten)] == [models.Flatten]


def test_flatten_sends_the_gradient_back_in_the_memory_format_its_input_had():
    torch.manual_seed(0)
    for memory_format in (torch.channels_last, torch.contiguous_format):
        x = torch.randn(4, 8, 5, 5).contiguous(memory_format=memory_format).requires_grad_(True)
        ref = x.detach().clone().requires_grad_(True)
        g = torch.randn(4, 200)
        y = models.Flatten()(x)
        assert torch.equal(y, nn.Flatten()(ref))
        y.backward(g)
        nn.Flatten()(ref).backward(g)
        assert torch.equal(x.grad, ref.grad) and x.grad.is_contiguous(memory_format=memory_format)
    assert not ref.grad.is_contiguous(memory_format=torch.channels_last)  # nn.Flatten's, from channels-last too


def test_flatten_changes_no_value_of_a_channels_last_training():
    """fashionnet trained channels-last with the core's Flatten and with nn.Flatten: the same weights
    to the last bit (the max pool's backward gets its gradient in another layout, not other values)."""
    weights = []
    for flatten in (models.Flatten, nn.Flatten):
        torch.manual_seed(0)
        model = models.build("fashionnet")
        name = next(n for n, m in model.named_children() if isinstance(m, models.Flatten))
        setattr(model, name, flatten())
        model = model.to(memory_format=torch.channels_last).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step in range(3):
            x = torch.randn(16, 1, 28, 28).contiguous(memory_format=torch.channels_last)
            loss = F.nll_loss(model(x), torch.arange(16) % 10)
            opt.zero_grad()
            loss.backward()
            opt.step()
        weights.append([p.detach() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


@pytest.mark.parametrize("stem", [0, 8])
def test_fmnet_stem_is_optional(stem):
    model = models.build("fmnet", {"widths": [4, 8, 16], "stem": stem})
    convs = layers(model, nn.Conv2d)
    assert len(convs) == 6 + bool(stem)  # two per group, and the stem when asked for
    assert convs[0].in_channels == 1 and convs[0].out_channels == (stem or 4)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_fmnet_whiten_makes_the_first_conv_a_frozen_whitening_of_the_patches():
    model = models.build("fmnet", {"widths": [8, 8, 8], "whiten": True})
    conv = layers(model, nn.Conv2d)[0]
    assert isinstance(conv, models.Whitening) and not conv.weight.requires_grad
    assert models.data_initialised(model) == [conv]
    torch.manual_seed(0)  # images whose neighbouring pixels are correlated, as in real ones
    images = F.avg_pool2d(torch.randn(64, 1, 30, 30), 3, stride=1)
    conv.init_from(images)
    out = conv(images)
    assert torch.allclose(out[:, :4], -out[:, 4:])  # each filter and its negative
    feats = out[:, :4].permute(0, 2, 3, 1).reshape(-1, 4)
    cov = torch.cov(feats.T)
    corr = cov / cov.diag().sqrt().outer(cov.diag().sqrt())
    assert (corr - torch.eye(4)).abs().max() < 0.05  # decorrelated: the patches whitened
    assert model(images).shape == (64, 10)


@pytest.mark.parametrize("hparams, words", [
    ({"widths": [20, 8, 8], "whiten": True}, ["models.fmnet.whiten", "at most 18", "has 20", "widths[0]"]),
    ({"widths": [8, 8, 8], "stem": 7, "whiten": True}, ["models.fmnet.whiten", "even", "has 7", "models.fmnet.stem"]),
    ({"whiten": 1}, ["models.fmnet.whiten", "true or false"]),
])
def test_fmnet_whiten_rejects_a_first_conv_it_cannot_fill(hparams, words):
    with pytest.raises(ConfigError) as e:
        models.build("fmnet", hparams)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("arch, hparams, words", [
    ("resnet", {}, ["unknown architecture 'resnet'", "tinyvgg"]),
    ("tinyvgg", {"hidden": 10}, ["models.tinyvgg.hidden", "unknown hyperparameter", "hidden_units"]),
    ("tinyvgg", {"hidden_units": 0}, ["models.tinyvgg.hidden_units", "integer >= 1"]),
    ("linear", {"hidden": True}, ["models.linear.hidden"]),
    ("linear", {"hidden": 0}, ["models.linear.hidden", "integer >= 1"]),
    ("fmnet", {"stem": -1}, ["models.fmnet.stem", "integer >= 0"]),
    ("linear", {"hidden": 2.5}, ["models.linear.hidden"]),
    ("ffn_bn", {"dropout": 1.0}, ["models.ffn_bn.dropout", "[0, 1)"]),
    ("cnn_bn", {"channels": []}, ["models.cnn_bn.channels", "non-empty list"]),
    ("cnn_bn", {"fc": [128, "x"]}, ["models.cnn_bn.fc"]),
])
def test_registry_rejects_unknown_names_and_bad_hparams(arch, hparams, words):
    with pytest.raises(ConfigError) as e:
        models.build(arch, hparams)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("arch, hparams", [("tinyvgg", {"hidden_units": 6}), ("fashionnet", {"hidden": 16}),
                                           ("ffn_bn", {"widths": [32, 16, 8, 4]}), ("cnn_bn", {"fc": [32, 16]}),
                                           ("fmnet", {"widths": [8, 8, 8], "stem": 6, "whiten": True})])
def test_checkpoint_rebuilds_the_model_from_the_file_alone(tmp_path, monkeypatch, arch, hparams):
    torch.manual_seed(1)
    model = models.build(arch, hparams)
    model.train()(torch.randn(8, 1, 28, 28))  # move batch-norm running statistics off their init
    for layer in models.data_initialised(model):  # and a whitening off its random init
        layer.init_from(torch.randn(16, 1, 28, 28))
    model.eval()
    x = torch.randn(4, 1, 28, 28)
    path = tmp_path / "m.pt"
    spec = make_spec(arch, hparams, model="mine")
    checkpoint.save(path, model, spec, Stats(0.28, 0.35), run_id="run42", bf16=False)

    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    rebuilt, ckpt = checkpoint.load(path)
    assert loads and all(k.get("weights_only") is True for k in loads)
    assert ckpt.spec == spec and ckpt.spec.model == "mine"  # the run spec comes back whole
    assert ckpt.classes == CLASSES and ckpt.run_id == "run42" and ckpt.stats == Stats(0.28, 0.35)
    assert not rebuilt.training
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
    # The whole file is plain data: the strict loader reads it with no allow-listed globals.
    raw = real_load(path, weights_only=True)
    assert set(raw) >= {"spec", "state_dict", "classes", "stats", "bf16"}
    assert raw["spec"]["params_hash"] == spec.params_hash
