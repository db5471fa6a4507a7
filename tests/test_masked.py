"""The masked-model base: budget, floors, groups of weights per mask element, finalize, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import probmask
from probmask import OUTPUT_CHANNEL, MaskedModel
from probmask.app.baselines import Magnitude
from probmask.budget import check_sparsity, resolve_floors


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 6), nn.ReLU(),
                         nn.Linear(6, 4))


def test_a_mask_element_can_stand_for_a_whole_output_channel():
    """Granularity "output_channel": one mask element per conv filter / linear row. The base lays
    them out, applies each to its whole group, fixes exactly k of them and bakes whole zero rows."""
    model = _net()
    x = torch.randn(2, 3, 6, 6)
    method = Magnitude(model, 0.5, granularity=OUTPUT_CHANNEL, floor=None)
    assert method.layout.sizes == [8, 6, 4] and method.total == 18
    assert method.layout.weights_per_element == [27, 128, 6]
    assert method.target_kept == 9
    mask = method.fix_mask()
    assert int(mask.sum()) == 9
    norms = [model[0].parametrizations.weight.original.detach().flatten(1).norm(dim=1),
             model[3].parametrizations.weight.original.detach().norm(dim=1),
             model[5].parametrizations.weight.original.detach().norm(dim=1)]
    kept_norms, dropped_norms = torch.cat(norms)[mask], torch.cat(norms)[~mask]
    assert float(kept_norms.min()) >= float(dropped_norms.max())  # the largest groups by L2 norm
    masks = method.masks()
    assert masks["0.weight"].shape == (8, 3, 3, 3)
    model.eval()
    with torch.no_grad():
        before = model(x)
    plain = method.finalize()
    assert not any(hasattr(m, "parametrizations") for m in plain.modules())
    for name, m in masks.items():
        weight = plain.get_parameter(name)
        rows = weight.flatten(1).abs().sum(1) > 0
        assert torch.equal(rows, m.flatten(1).all(1))  # whole output units kept or removed
        assert torch.equal(m.flatten(1).all(1), m.flatten(1).any(1))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), before)
    report = method.report()
    assert report.fixed and sum(layer.kept for layer in report.layers) == 9


class _Largest(MaskedModel):
    def _final_mask(self, score_fn, generator):
        return probmask.topk_mask(torch.arange(self.total, dtype=torch.float32), self.target_kept,
                                  self.layout.sizes, self.floors)


def test_finalize_restores_order_flags_and_leaves_a_plain_model():
    model = _net()
    model[5].bias.requires_grad_(False)
    keys, flags = list(model.state_dict()), {n: p.requires_grad for n, p in model.named_parameters()}
    method = _Largest(model, 0.7, freeze_weights=True)
    assert method.weight_parameters() == [] and not method.finetunes
    method.fix_mask()
    method.finalize()
    assert list(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with pytest.raises(RuntimeError, match="finalized"):
        method.fix_mask()


def test_a_state_of_another_model_or_method_is_refused_naming_the_shapes():
    method = _Largest(_net(), 0.7)
    state = method.state_dict()
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5), nn.ReLU(),
                          nn.Linear(5, 4))
    with pytest.raises(ValueError, match=r"3\.weight: \[6, 128\] saved, \[5, 128\] here"):
        _Largest(other, 0.7).load_state_dict(state)
    with pytest.raises(ValueError, match="saved by '_Largest'"):
        Magnitude(_net(), 0.7).load_state_dict(state)


def test_sparsity_accepts_real_numbers_of_any_type_and_names_the_type_otherwise():
    assert check_sparsity(np.float32(0.9)) == pytest.approx(0.9)
    assert check_sparsity(torch.tensor(0.25)) == 0.25
    for bad in (True, "0.9", float("nan"), 1.0, torch.tensor([0.5])):
        with pytest.raises(ValueError, match=r"must lie in \(0, 1\), got .*\(\w+"):
            check_sparsity(bad)


def test_floors_refuse_nan_and_empty_layers_are_refused_by_name():
    with pytest.raises(ValueError, match="floor must be"):
        resolve_floors(float("nan"), [3], [30], 10, 0.5)
    model = nn.Sequential(nn.Linear(4, 0), nn.Linear(0, 3))
    with pytest.raises(ValueError, match=r"\['0.weight', '1.weight'\] have no elements"):
        probmask.ProbMask(model, 0.5)
