"""Model registry: every registered model builds, runs, takes ProbMask and round-trips through model.pt."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from probmask import ProbMask
from probmask.app.artifacts import load_model, save_model
from probmask.app.errors import UserError
from probmask.app.models import build_model, check_input, model_names

# name -> (input shape, options, expected number of prunable weight tensors)
CASES = {
    "lenet300": ((1, 28, 28), {}, 3),
    "lenet5": ((1, 28, 28), {}, 5),
    "resnet32": ((3, 32, 32), {"width": 4}, 31 + 2 + 1),  # 31 3x3 convs, 2 shortcut convs, fc
    "vgg19_bn": ((3, 32, 32), {"width": 2}, 16 + 1),
    "torchvision:resnet18": ((3, 32, 32), {}, 20 + 1),
    # the library's default selection: patch embedding, 2 x (attention out + 2 MLP), head; the
    # runner adds the attention input projections (tests/test_vit.py)
    "vit_tiny": ((1, 28, 28), {"dim": 16, "depth": 2, "heads": 2, "mlp": 32}, 1 + 2 * 3 + 1),
}


def test_every_registered_model_is_covered():
    assert set(model_names()) <= set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_builds_runs_and_takes_probmask(name):
    shape, options, prunable = CASES[name]
    torch.manual_seed(0)
    model = build_model(name, 7, shape, **options)
    x = torch.randn(3, *shape)
    assert model(x).shape == (3, 7)
    keys = list(model.state_dict())
    pm = ProbMask(model, 0.9)
    assert len(pm.targets) == prunable
    model.train()
    model(x).sum().backward()
    assert pm.scores.grad is not None and torch.isfinite(pm.scores.grad).all()
    pm.fix_mask("topk")
    plain = pm.finalize()
    assert list(plain.state_dict()) == keys  # original keys, no parametrizations left
    assert plain(x).shape == (3, 7)


def test_lenet300_is_784_300_100_10():
    model = build_model("lenet300", 10, (1, 28, 28))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 300), (300, 100), (100, 10)]
    assert sum(m.weight.numel() for m in linears) == 266_200


@pytest.mark.parametrize(("width", "channels"), [(None, [32, 64, 128]), (16, [16, 32, 64])])
def test_resnet32_widths(width, channels):
    options = {} if width is None else {"width": width}
    model = build_model("resnet32", 10, (3, 32, 32), **options)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 31  # 1 stem + 3 stages x 5 blocks x 2, + fc = 32 weighted layers
    assert sorted({m.out_channels for m in convs}) == channels
    assert model.fc.in_features == channels[-1]


def test_vgg19_bn_has_16_convs_with_batch_norm():
    model = build_model("vgg19_bn", 100, (3, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16 and [c.out_channels for c in convs][-1] == 512
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 16
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_lenet5_adapts_to_32x32_rgb():
    model = build_model("lenet5", 10, (3, 32, 32))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_model_is_never_downloaded_and_takes_options():
    model = build_model("torchvision:resnet18", 5, (3, 32, 32), zero_init_residual=True)
    assert model.fc.out_features == 5
    assert torch.all(model.layer1[0].bn2.weight == 0)  # the option reached torchvision


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("resnet33", {}, "unknown model 'resnet33': choose one of lenet300, lenet5, resnet32, vgg19_bn"),
        ("torchvision:resnet5", {}, "unknown torchvision classification model 'resnet5'"),
        ("lenet300", {"width": 3}, "model lenet300 has no option width; its options are: hidden"),
        ("torchvision:resnet18", {"weights": "DEFAULT"}, "always built from scratch (weights=None)"),
        ("torchvision:resnet18", {"bogus": 1}, "torchvision:resnet18 does not accept these options"),
        ("lenet5", {}, "lenet5 needs images [C, H, W] of at least 12x12 pixels"),
    ],
)
def test_bad_names_and_options_are_user_errors(name, options, message):
    shape = (8,) if name == "lenet5" else (3, 32, 32)
    with pytest.raises(UserError) as info:
        build_model(name, 10, shape, **options)
    assert message in str(info.value)


def test_close_torchvision_name_is_suggested():
    with pytest.raises(UserError, match="did you mean torchvision:resnet50"):
        build_model("torchvision:resnet05", 10, (3, 32, 32))


def test_check_input_explains_a_shape_mismatch():
    model = build_model("torchvision:resnet18", 10, (1, 28, 28))
    with pytest.raises(UserError, match=r"does not accept this data's examples of shape \[1, 28, 28\]"):
        check_input(model, (1, 28, 28), "torchvision:resnet18")
    check_input(build_model("lenet5", 10, (1, 28, 28)), (1, 28, 28), "lenet5")  # fits: no error


def test_model_file_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet32", 10, (3, 32, 32), width=4)
    pm = ProbMask(model, 0.95)
    pm.fix_mask("topk")
    masks = pm.masks()
    plain = pm.finalize().eval()
    meta = {"model": "resnet32", "model_options": {"width": 4}, "num_classes": 10, "input_shape": [3, 32, 32]}
    save_model(tmp_path / "model.pt", plain, masks, meta)
    raw = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(raw) >= {"state_dict", "masks", "meta"}
    assert raw["meta"]["kept"] == pm.target_kept
    back, back_masks, back_meta = load_model(tmp_path / "model.pt")
    back.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x), plain(x))
    assert all(torch.equal(back_masks[k], masks[k]) for k in masks)
    assert back_meta["model_options"] == {"width": 4}
