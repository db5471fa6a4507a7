"""CSR execution: same outputs as the dense model, right layers converted, copies and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deploy_util import TinyCNN, mlp, prune
from probmask.sparse import SparseConv2d, SparseLinear, csr32, sparse_layers, to_sparse


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("batch", [1, 7])
def test_sparse_mlp_matches_dense(sparsity, batch):
    model, _ = prune(mlp((96, 128, 64, 10)), sparsity, input_shape=(96,))
    fast = to_sparse(model, max_density=1.0)
    assert sparse_layers(fast) == ["0", "2", "4"]
    x = torch.randn(batch, 96)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=0)
    assert isinstance(model[0], nn.Linear)  # the original is left alone


def test_linear_on_extra_leading_dims_and_without_bias():
    layer = nn.Linear(12, 5, bias=False)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < 0.3)
    fast = SparseLinear.from_dense(layer)
    x = torch.randn(2, 3, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x), atol=1e-6, rtol=0)
        assert torch.equal(fast.to_dense().weight, layer.weight)
    assert fast.nnz == int((layer.weight != 0).sum())


def test_all_zero_weight_gives_the_bias():
    layer = nn.Linear(6, 4)
    with torch.no_grad():
        layer.weight.zero_()
    fast = SparseLinear.from_dense(layer)
    with torch.no_grad():
        torch.testing.assert_close(fast(torch.randn(3, 6)), layer.bias.expand(3, 4))


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
@pytest.mark.parametrize("batch", [1, 3])
def test_sparse_conv_matches_dense(stride, padding, dilation, batch):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 2), stride=stride, padding=padding, dilation=dilation)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.2)
    fast = SparseConv2d(conv)
    x = torch.randn(batch, 4, 11, 9)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), conv(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(fast(x[0]), conv(x[0]), atol=1e-5, rtol=0)


def test_convs_only_on_request_and_unsupported_convs_stay_dense():
    model, _ = prune(TinyCNN(), 0.9, input_shape=(1, 8, 8))
    assert sparse_layers(to_sparse(model)) == ["fc1", "fc2"]
    with_convs = to_sparse(model, convs=True)
    assert sparse_layers(with_convs) == ["conv", "fc1", "fc2"]
    x = torch.randn(4, 1, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(with_convs(x), model(x), atol=1e-5, rtol=0)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding="same"))
    assert sparse_layers(to_sparse(grouped, convs=True)) == []
    with pytest.raises(ValueError, match="groups=1"):
        SparseConv2d(grouped[0])


def test_max_density_decides_which_layers_convert():
    model = mlp((32, 32, 32, 10))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(32, 32) < 0.1)  # sparse
        model[2].weight.mul_(torch.rand(32, 32) < 0.8)  # dense-ish
    assert sparse_layers(to_sparse(model, max_density=0.35)) == ["0"]
    with pytest.raises(ValueError, match="max_density"):
        to_sparse(model, max_density=2.0)


def test_calibration_keeps_only_layers_that_are_faster(monkeypatch):
    """With example_input, a layer stays dense unless its CSR version timed faster."""
    model = mlp((64, 64, 64, 10))
    with torch.no_grad():
        for layer in model[::2]:
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.1)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        expected = model(x)
        real = to_sparse(model, example_input=x, repeats=3)  # real timings: any choice is correct
        torch.testing.assert_close(real(x), expected, atol=1e-5, rtol=0)

    seen_shapes = []

    def fake_time(fn, repeats):  # dense: 2; CSR: 1 for the 64x64 layers, 3 for the last one
        module, layer_input = fn.__defaults__
        seen_shapes.append(tuple(layer_input.shape))
        if isinstance(module, SparseLinear):
            return 1.0 if module.out_features == 64 else 3.0
        return 2.0

    monkeypatch.setattr("probmask.sparse._median_time", fake_time)
    calibrated = to_sparse(model, example_input=x)
    assert sparse_layers(calibrated) == ["0", "2"]  # both 64x64 layers "faster", the 64->10 not
    assert set(seen_shapes) == {(3, 64)}  # each layer was timed on the input it really gets
    with torch.inference_mode():
        torch.testing.assert_close(calibrated(x), expected, atol=1e-5, rtol=0)


def test_model_that_is_a_single_linear_and_copies():
    layer = nn.Linear(8, 3)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(3, 8) < 0.2)
    fast = to_sparse(layer)
    assert isinstance(fast, SparseLinear)
    clone = copy.deepcopy(fast)
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), layer(x), atol=1e-6, rtol=0)
    state = fast.state_dict()
    assert set(state) == {"crow_indices", "col_indices", "values", "bias"}
    assert state["crow_indices"].dtype == torch.int32


def test_float64_works_and_other_dtypes_are_refused():
    layer = nn.Linear(8, 3).double()
    fast = SparseLinear.from_dense(layer)
    x = torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), layer(x))
    with pytest.raises(ValueError, match="float32/float64"):
        SparseLinear.from_dense(nn.Linear(8, 3).half())
    assert sparse_layers(to_sparse(nn.Sequential(nn.Linear(8, 3).half()), max_density=1.0)) == []
    with pytest.raises(ValueError, match="2-D"):
        csr32(torch.zeros(2, 2, 2))


def test_single_rows_take_the_scipy_path_and_see_weight_updates():
    pytest.importorskip("scipy")
    layer = nn.Linear(400, 100)  # 8,000 weights kept: above the size where SciPy takes over
    with torch.no_grad():
        layer.weight.mul_(torch.rand(100, 400) < 0.2)
    fast = SparseLinear.from_dense(layer)
    torch_only = SparseLinear.from_dense(layer, use_scipy=False)
    x = torch.randn(1, 400)
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(fast(x), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(torch_only(x), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(fast(x[0]), expected[0], atol=1e-6, rtol=0)  # unbatched input
    assert fast._scipy is not None and fast._scipy[3] is not None  # the SciPy matrix was used
    assert torch_only._scipy is None

    state = {k: v.clone() for k, v in fast.state_dict().items()}
    state["values"] = state["values"] * 2
    fast.load_state_dict(state)  # in place: the cached SciPy matrix must see it
    with torch.no_grad():
        torch.testing.assert_close(fast(x) - fast.bias, 2 * (expected - layer.bias), atol=1e-5, rtol=0)

    x_grad = torch.randn(1, 400, requires_grad=True)  # autograd inputs use torch's product
    fast(x_grad).sum().backward()
    assert x_grad.grad is not None and x_grad.grad.shape == (1, 400)
