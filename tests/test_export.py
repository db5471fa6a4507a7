"""Export formats: exact round trips, the sparse size bound, ONNX vs onnxruntime, bad files."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from torch import nn

from deploy_util import TinyCNN, checkpoint, mlp, prune
from probmask import export
from probmask.export import Checkpoint, CheckpointError


@pytest.fixture(scope="module")
def cnn():
    model, masks = prune(TinyCNN(), 0.9, input_shape=(1, 8, 8))
    return model, masks


@pytest.fixture(scope="module")
def cnn_ckpt(cnn):
    model, masks = cnn
    return checkpoint(model, masks, model="tiny_cnn", input_shape=[1, 8, 8], num_classes=10)


def assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert list(a.state_dict) == list(b.state_dict)
    for k, v in a.state_dict.items():
        assert b.state_dict[k].dtype == v.dtype
        assert torch.equal(b.state_dict[k], v), k
    assert set(a.masks) == set(b.masks)
    for k, v in a.masks.items():
        assert torch.equal(b.masks[k], v), k


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "sparse"])
def test_round_trip_is_exact(tmp_path, cnn_ckpt, fmt):
    path = export.save(cnn_ckpt, tmp_path / f"m.{fmt}", fmt)
    assert export.detect_format(path) == fmt
    back = export.load(path)
    assert_same(cnn_ckpt, back)
    assert back.meta["model"] == "tiny_cnn"
    assert back.meta["kept"] == cnn_ckpt.kept
    assert back.meta["sparsity"] == pytest.approx(cnn_ckpt.sparsity)
    assert [layer["name"] for layer in back.meta["layers"]] == ["conv.weight", "fc1.weight", "fc2.weight"]
    for layer in back.meta["layers"]:
        assert layer["kept"] == int(cnn_ckpt.masks[layer["name"]].sum())
        assert layer["density"] == pytest.approx(layer["kept"] / layer["numel"])


def test_format_is_read_from_content_not_name(tmp_path, cnn_ckpt):
    path = export.save(cnn_ckpt, tmp_path / "weights.bin", "sparse")
    assert export.detect_format(path) == "sparse"
    assert_same(cnn_ckpt, export.load(path))


def test_sparse_file_is_at_most_a_tenth_at_99_percent(tmp_path):
    model, masks = prune(mlp((256, 256, 128, 10)), 0.99)
    ckpt = checkpoint(model, masks, model="mlp")
    sizes = {fmt: os.path.getsize(export.save(ckpt, tmp_path / f"m.{fmt}", fmt))
             for fmt in ("pt", "safetensors", "sparse")}
    assert sizes["sparse"] * 10 <= sizes["safetensors"]
    assert sizes["sparse"] * 10 <= sizes["pt"]
    assert_same(ckpt, export.load(tmp_path / "m.sparse"))


def test_encoding_is_chosen_per_tensor(tmp_path):
    """CSR wins at very high sparsity, the bitmask at moderate sparsity; both decode exactly."""
    model = mlp((128, 128, 10))
    masks = {
        "0.weight": torch.rand(128, 128) < 0.01,  # 1% density: CSR (8 B/nnz) beats bits (1/8 B/weight)
        "2.weight": torch.rand(10, 128) < 0.5,  # 50%: bitmask
    }
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)
    ckpt = checkpoint(model, masks)
    path = export.save_sparse(ckpt, tmp_path / "m.sparse")
    back = export.load(path)
    encodings = {k["name"]: k["encoding"] for k in back.meta["keys"]}
    assert encodings == {"0.weight": "csr", "0.bias": "dense", "2.weight": "bitmask", "2.bias": "dense"}
    assert_same(ckpt, back)
    assert export.sparse_nbytes(ckpt.state_dict, masks) < os.path.getsize(path)


def test_kept_weight_that_is_exactly_zero_stays_in_the_mask(tmp_path):
    model = mlp((16, 8))
    mask = torch.rand(8, 16) < 0.2
    mask[0, 0] = True
    with torch.no_grad():
        model[0].weight.mul_(mask)
        model[0].weight[0, 0] = 0.0
    ckpt = checkpoint(model, {"0.weight": mask})
    back = export.load(export.save_sparse(ckpt, tmp_path / "m.sparse"))
    assert bool(back.masks["0.weight"][0, 0])
    assert_same(ckpt, back)


def test_sparse_refuses_weights_outside_the_mask(tmp_path):
    model = mlp((16, 8))
    ckpt = checkpoint(model, {"0.weight": torch.rand(8, 16) < 0.2})
    with pytest.raises(ValueError, match="nonzero where its mask is False"):
        export.save_sparse(ckpt, tmp_path / "m.sparse")


def test_loading_without_probmask_plain_torch_and_safetensors(tmp_path, cnn, cnn_ckpt):
    """The documented path for users without probmask: rebuild the model, load with torch."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    pruned, _ = cnn
    export.save_pt(cnn_ckpt, tmp_path / "m.pt")
    export.save_safetensors(cnn_ckpt, tmp_path / "m.safetensors")
    x = torch.randn(3, 1, 8, 8)
    expected = pruned(x)

    ckpt = torch.load(tmp_path / "m.pt", map_location="cpu", weights_only=True)
    model = TinyCNN().eval()
    model.load_state_dict(ckpt["state_dict"])
    assert torch.equal(model(x), expected)
    assert ckpt["meta"]["sparsity"] == pytest.approx(cnn_ckpt.sparsity)
    assert torch.equal(ckpt["masks"]["fc1.weight"], cnn_ckpt.masks["fc1.weight"])

    tensors = load_file(tmp_path / "m.safetensors")
    model = TinyCNN().eval()
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("masks/")})
    assert torch.equal(model(x), expected)
    masks = {k[len("masks/"):]: v for k, v in tensors.items() if k.startswith("masks/")}
    assert set(masks) == set(cnn_ckpt.masks)
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["probmask"])
    assert meta["model"] == "tiny_cnn"


def test_load_into_rejects_a_different_architecture(cnn_ckpt):
    with pytest.raises(CheckpointError, match="does not fit this Sequential.*missing keys"):
        export.load_into(mlp(), cnn_ckpt)
    with pytest.raises(CheckpointError, match="shape mismatch.*fc2.weight"):
        export.load_into(TinyCNN(num_classes=7), cnn_ckpt)
    model = export.load_into(TinyCNN(), cnn_ckpt)
    assert torch.equal(model.fc1.weight, cnn_ckpt.state_dict["fc1.weight"])


def test_onnx_matches_pytorch_and_onnxruntime(tmp_path, cnn):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, masks = cnn
    path = tmp_path / "m.onnx"
    result = export.export_onnx(model, path, [1, 8, 8], meta={"model": "tiny_cnn"})
    assert result is not None and result.max_abs_diff <= 1e-4
    assert export.detect_format(path) == "onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 8, 8)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        expected = model(x)
    assert expected.abs().max() > 1e-3  # a real comparison, not of zeros
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["probmask"]) == {"model": "tiny_cnn"}
    with pytest.raises(CheckpointError, match="ONNX"):
        export.load(path)


# ---------------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("fmt", ["pt", "safetensors", "sparse"])
@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_files_fail_clearly(tmp_path, cnn_ckpt, fmt, keep):
    path = export.save(cnn_ckpt, tmp_path / f"m.{fmt}", fmt)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated|corrupted|not a readable"):
        export.load(path)


@pytest.mark.parametrize("content", [b"", b"abc", b"hello world, not a model at all" * 10])
def test_garbage_files_fail_clearly(tmp_path, content):
    path = tmp_path / "m.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        export.load(path)


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        export.load(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="directory"):
        export.load(tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should never run",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="objects other than tensors and plain values.*does not load those") as info:
        export.load(path)
    assert "weights_only" not in str(info.value)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(CheckpointError, match="legacy"):
        export.load(legacy)


def test_pt_file_that_is_not_a_probmask_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a probmask model file"):
        export.load(path)


def _rewrite(path, tmp_path, name, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, tmp_path / name, metadata=header)
    return tmp_path / name


def test_tampered_sparse_data_is_detected(tmp_path, cnn_ckpt):
    model, masks = prune(mlp((64, 64, 10)), 0.99)
    csr = export.save_sparse(checkpoint(model, masks), tmp_path / "csr.sparse")
    bitmask = export.save_sparse(cnn_ckpt, tmp_path / "bits.sparse")
    assert {e["encoding"] for e in export.load(csr).meta["keys"]} == {"csr", "dense"}
    assert "bitmask" in {e["encoding"] for e in export.load(bitmask).meta["keys"]}

    def shift_columns(t):
        t["csr/0.weight/col"] = t["csr/0.weight/col"] + 10_000

    def break_row_pointers(t):
        t["csr/0.weight/crow"] = t["csr/0.weight/crow"].flip(0)

    def drop(t):
        del t["csr/0.weight/values"]

    def drop_value(t):
        t["bitmask/fc1.weight/values"] = t["bitmask/fc1.weight/values"][1:]

    cases = [(csr, shift_columns, "column index out of range"), (csr, break_row_pointers, "row pointers"),
             (csr, drop, "missing"), (bitmask, drop_value, "does not match the bitmask")]
    for i, (path, change, message) in enumerate(cases):
        with pytest.raises(CheckpointError, match=message):
            export.load(_rewrite(path, tmp_path, f"bad{i}.sparse", change))


def test_mask_of_wrong_shape_is_rejected(tmp_path):
    model = mlp((16, 8))
    ckpt = Checkpoint(model.state_dict(), {"0.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(CheckpointError, match="shape"):
        export.save_pt(ckpt, tmp_path / "m.pt")


def test_unknown_format_and_unserialisable_meta(tmp_path, cnn_ckpt):
    with pytest.raises(ValueError, match="unknown format"):
        export.save(cnn_ckpt, tmp_path / "m.x", "zip")
    with pytest.raises(ValueError, match="JSON"):
        export.make_meta({}, model=nn.Linear(1, 1))


def test_the_recipes_for_reading_files_without_probmask_run_verbatim(tmp_path, monkeypatch):
    """The recipe in probmask.export's docstring and the README's snippet, exactly as written, on
    files of a pruned torchvision model."""
    import textwrap
    from pathlib import Path

    import torchvision

    import probmask

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    pm = probmask.ProbMask(model, 0.9)
    pm.fix_mask()
    masks = pm.masks()
    pm.finalize()
    ckpt = Checkpoint(model.state_dict(), masks, {"model": "torchvision:mobilenet_v3_small"})
    export.save_pt(ckpt, tmp_path / "model.pt")
    export.save_safetensors(ckpt, tmp_path / "model.safetensors")
    monkeypatch.chdir(tmp_path)

    doc = export.__doc__.split("then::\n", 1)[1].split("\nThe ``sparse`` format", 1)[0]
    env: dict = {}
    exec(compile(textwrap.dedent(doc), "probmask/export/__init__.py", "exec"), env)
    assert env["meta"]["model"] == "torchvision:mobilenet_v3_small"
    for name, value in model.state_dict().items():
        assert torch.equal(env["model"].state_dict()[name], value), name
    assert all(torch.equal(env["masks"][k], v) for k, v in masks.items())

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = next(b.split("```", 1)[0] for b in readme.split("```python\n")[1:] if b.startswith("ckpt = torch.load"))
    fresh = torchvision.models.mobilenet_v3_small(num_classes=10)
    env = {"torch": torch, "model": fresh}
    exec(compile(snippet, "README.md", "exec"), env)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fmt", ["safetensors", "sparse"])
def test_safetensors_header_length_starting_with_0x80_is_not_a_pickle(tmp_path, cnn_ckpt, fmt):
    """The first byte of a safetensors file is its header length's low byte: 0x80 is a pickle's too."""
    for pad in range(0, 2048, 8):
        ckpt = Checkpoint(cnn_ckpt.state_dict, cnn_ckpt.masks, {**cnn_ckpt.meta, "pad": "x" * pad})
        path = export.save(ckpt, tmp_path / f"m.{fmt}", fmt)
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    assert export.detect_format(path) == fmt
    assert_same(cnn_ckpt, export.load(path))
