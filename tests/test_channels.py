"""Coupled channel groups from Torch-Pruning's graph: masking a group's entries and removing them
physically compute the same function; the smaller model exports with torch.export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from probmask.app.models import build_model
from probmask.channels import ChannelGraph, count_macs


def _model(name: str, **options) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(name, 10, (1, 28, 28), **options)
    x = torch.randn(8, 1, 28, 28)
    model.train()
    model(x)  # batch-norm statistics that are not the initial ones
    return model.eval(), x


def _random_keep(graph: ChannelGraph, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keep = [torch.rand(n, generator=gen) < 0.4 for n in graph.sizes]
    for k in keep:
        k[torch.randint(len(k), (), generator=gen)] = True
    return keep


def test_residual_couplings_share_one_group_and_the_classifier_is_no_root():
    model, x = _model("resnet32", width=8)
    graph = ChannelGraph(model, x)
    layers = [set(g.layers) for g in graph.groups]
    stem = next(g for g in layers if "conv1" in g)
    # the stem's channels are added to every first-stage block's output
    assert {"bn1", *(f"layer1.{i}.conv2" for i in range(5)), *(f"layer1.{i}.bn2" for i in range(5))} <= stem
    assert not any("fc" in g for g in layers)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    owners = {n: sum(n in g for g in layers) for n in convs}
    assert all(count == 1 for count in owners.values()), owners


@pytest.mark.parametrize("name, options", [("lenet300", {}), ("lenet5", {}), ("resnet32", {"width": 8})])
def test_masked_and_shrunk_models_agree(name, options):
    model, x = _model(name, **options)
    graph = ChannelGraph(model, x)
    macs, params = count_macs(model, x)
    for seed in range(2):
        keep = _random_keep(graph, seed)
        graph.mask_(keep)
    masked = model(x)
    graph.shrink(keep)
    small_macs, small_params = count_macs(model, x)
    torch.testing.assert_close(model(x), masked, rtol=0, atol=1e-5)
    assert small_macs < macs and small_params < params


def test_lenet300_macs_are_the_matrix_products_of_the_kept_widths():
    """Per example, whatever the batch."""
    model, x = _model("lenet300")
    assert count_macs(model, x) == (784 * 300 + 300 * 100 + 100 * 10, 266610)
    graph = ChannelGraph(model, x)
    keep = _random_keep(graph, 3)
    widths = dict(zip(graph.sizes, (int(k.sum()) for k in keep)))
    graph.shrink(keep)
    h1, h2 = widths[300], widths[100]
    assert count_macs(model, x)[0] == 784 * h1 + h1 * h2 + h2 * 10


def test_the_shrunk_model_exports_and_reloads_with_torch_export(tmp_path):
    model, x = _model("resnet32", width=8)
    graph = ChannelGraph(model, x)
    graph.shrink(_random_keep(graph, 1))
    expected = model(x)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "small.pt2")
    loaded = torch.export.load(tmp_path / "small.pt2").module()
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-6)


def test_excluded_layers_and_what_is_coupled_to_them_stay():
    model, x = _model("resnet32", width=8)
    graph = ChannelGraph(model, x, exclude=["layer2.0.conv1"])
    assert not any("layer2.0.conv1" in g.layers for g in graph.groups)
    assert any("layer2.1.conv1" in g.layers for g in graph.groups)
    with pytest.raises(ValueError, match=r"exclude names \['nope'\] are not modules"):
        ChannelGraph(model, x, exclude=["nope"])


def test_bad_keep_vectors_are_refused_by_name():
    model, x = _model("lenet5")
    graph = ChannelGraph(model, x)
    with pytest.raises(ValueError, match="one keep vector per channel group"):
        graph.mask_([])
    wrong = [torch.ones(n + 1, dtype=torch.bool) for n in graph.sizes]
    with pytest.raises(ValueError, match="needs .* entries"):
        graph.shrink(wrong)
    none = [torch.ones(n, dtype=torch.bool) for n in graph.sizes]
    none[0][:] = False
    with pytest.raises(ValueError, match=r"keeps no channel; keep at least one or exclude \["):
        graph.shrink(none)


def test_a_layer_channel_masks_cannot_handle_is_named_with_the_fix():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 6, 3), nn.ReLU(), nn.Conv2d(6, 2, 1))
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"layer '2' \(ConvTranspose2d\).*exclude=\['2'\]"):
        ChannelGraph(model, x, root_types=(nn.Conv2d, nn.ConvTranspose2d))


def test_convolution_macs_count_every_output_element_per_example():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=4))
    macs, params = count_macs(model, torch.randn(5, 3, 10, 10))
    assert macs == 8 * 10 * 10 * 3 * 9 + 8 * 10 * 10 * 2 * 9
    assert params == sum(p.numel() for p in model.parameters())
