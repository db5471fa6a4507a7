"""Model files are data, not instructions: crafted files for ``probmask eval`` / ``export`` / ``load``.

Every crafted file is refused with one line (exit status 2) before anything of the size it declares
is allocated (the tests simply finish quickly), and nothing is created or changed anywhere: the
crafted paths point into ``tmp_path``, the working directory and ``TORCH_HOME`` too, and the whole
tree is compared before and after.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch

from cli_util import assert_user_error, run, snapshot
from probmask import export
from probmask.app.cli import main
from probmask.app.models import build_model
from probmask.export import Checkpoint, CheckpointError

LENET_OPTIONS = {"hidden": [32, 16]}


def _pruned(model: torch.nn.Module, density: float = 0.1, seed: int = 0) -> tuple[dict, dict]:
    """The model's state_dict with every weight matrix pruned to ``density`` (zeros in place), and masks."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {}
    for name, value in state.items():
        if name.endswith("weight") and value.dim() > 1:
            masks[name] = torch.rand(value.shape, generator=generator) < density
            value.mul_(masks[name])
    return state, masks


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    """A small LeNet-300-100 (784-32-16-10) as a runner's model.pt would hold it."""
    state, masks = _pruned(build_model("lenet300", 10, [1, 28, 28], **LENET_OPTIONS))
    meta = {"model": "lenet300", "model_options": dict(LENET_OPTIONS), "num_classes": 10,
            "input_shape": [1, 28, 28], "data": "mnist5k", "method": "probmask",
            "config": {"data": {"name": "mnist5k", "root": "data", "download": False}}}
    return Checkpoint(state, masks, meta)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A very narrow resnet32 (width 2) for 8x8 RGB images."""
    state, masks = _pruned(build_model("resnet32", 10, [3, 8, 8], width=2), density=0.5)
    meta = {"model": "resnet32", "model_options": {"width": 2}, "num_classes": 10, "input_shape": [3, 8, 8],
            "data": "cifar10"}
    return Checkpoint(state, masks, meta)


@pytest.fixture(scope="module")
def resnet18():
    return _pruned(build_model("torchvision:resnet18", 10, [3, 32, 32]))


@pytest.fixture
def place(tmp_path, monkeypatch):
    """tmp_path as the working directory and torch's cache: whatever a command creates shows there."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def save_raw(path: Path, state: dict, masks: dict, meta: dict) -> Path:
    """What save_pt writes, but with the metadata exactly as given (no JSON normalisation)."""
    torch.save({"state_dict": state, "masks": masks, "meta": meta}, path)
    return path


def crafted(ckpt: Checkpoint, path: Path, **changes: object) -> Path:
    meta = json.loads(json.dumps(ckpt.meta))
    meta.update(changes)
    return save_raw(path, ckpt.state_dict, ckpt.masks, meta)


def refused_unchanged(capsys, root: Path, argv: list, *needles: str) -> str:
    """Run ``probmask *argv``: refused with one line, and nothing under ``root`` created or changed."""
    before = snapshot(root)
    code, out, err = run(capsys, *argv)
    assert_user_error(code, err, *needles)
    assert snapshot(root) == before
    return err


# ---------------------------------------------------------------------------------- the data set
def test_crafted_data_root_and_download_are_never_used(capsys, place, lenet):
    """The file's run config names a data root and download=true: eval reads neither (mnist5k, bundled)."""
    crafted_root = place / "crafted_root"
    model = crafted(lenet, place / "model.pt", config={
        "data": {"name": "cifar10", "root": str(crafted_root), "download": True, "num_workers": 64,
                 "train_size": 10**12, "test_size": 10**12}})
    before = snapshot(place)
    code, out, err = run(capsys, "eval", model, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["data"] == "mnist5k" and 0.0 <= report["test_accuracy"] <= 100.0
    assert snapshot(place) == before
    assert not crafted_root.exists() and not (place / "work" / "data").exists()


def test_a_data_set_the_file_names_is_not_downloaded(capsys, place, lenet):
    crafted_root = place / "crafted_root"
    model = crafted(lenet, place / "model.pt", data="cifar10",
                    config={"data": {"name": "cifar10", "root": str(crafted_root), "download": True}})
    before = snapshot(place)
    code, out, err = run(capsys, "eval", model)
    assert code == 0
    assert "test accuracy not measured" in err and "--download" in err and "sparsity" in out
    assert snapshot(place) == before
    assert not crafted_root.exists() and not (place / "work" / "data").exists()


def test_eval_of_a_real_run_with_the_bundled_data(capsys, place):
    """A real (tiny) ``probmask run``; its model.pt evaluates on the bundled data set."""
    out = place / "run"
    assert main(["run", "--out", str(out), "--quiet", "train.epochs=1", "finetune.epochs=1",
                 "data.train_size=64"]) == 0
    recorded = json.loads((out / "results.json").read_text())["test_accuracy"]
    capsys.readouterr()
    code, stdout, err = run(capsys, "eval", out / "model.pt", "--data", "mnist5k", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["data"] == "mnist5k" and report["model"] == "lenet300"
    assert report["test_accuracy"] == pytest.approx(recorded) == report["recorded_test_accuracy"]


# ---------------------------------------------------------------------------------- the architecture
@pytest.mark.parametrize("command", [["eval"], ["export", "--format", "sparse"]])
def test_crafted_num_classes(capsys, place, lenet, command):
    model = crafted(lenet, place / "model.pt", num_classes=10**11)
    refused_unchanged(capsys, place, [command[0], model, *command[1:]], "does not fit", "100000000000")


@pytest.mark.parametrize("command", [["eval"], ["export", "--format", "sparse"]])
@pytest.mark.parametrize("options", [{"width": 10**9}, {"width": 10**30}, {"width": -5}])
def test_crafted_width(capsys, place, resnet, command, options):
    model = crafted(resnet, place / "model.pt", model_options=options)
    refused_unchanged(capsys, place, [command[0], model, *command[1:]], str(model), "resnet32")


@pytest.mark.parametrize("options, needles", [
    ({"hidden": [10**9, 10**9]}, ["does not fit", "shape mismatch"]),
    ({"hidden": [1] * 100_000}, ["more than"]),  # stopped after the file's number of layers
    ({"hidden": "abc"}, ["hidden='abc'"]),
    ({"hidden": None}, ["hidden=None"]),
    ({"hidden": [32, 16], "evil": 1}, ["no option evil"]),
    ({"__class__": 1}, ["no option __class__"]),
    ([1, 2], ["model_options"]),
    ({"not an identifier": 1}, ["model_options"]),
])
def test_crafted_model_options(capsys, place, lenet, options, needles):
    model = crafted(lenet, place / "model.pt", model_options=options)
    refused_unchanged(capsys, place, ["eval", model], str(model), *needles)


@pytest.mark.parametrize("shape", [
    [1, 100_000, 100_000], [3, 2**12, 2**12 + 1], [1, -28, 28], [0, 28, 28], [1, 28, 28, 1, 1], [],
    ["1", "28", "28"], "abc", [1.0, 28.0, 28.0], [True, 28, 28], None, {"C": 1},
])
@pytest.mark.parametrize("command", [["eval"], ["export", "--format", "onnx"], ["export", "--format", "sparse"]])
def test_crafted_input_shape(capsys, place, lenet, shape, command):
    model = crafted(lenet, place / "model.pt", input_shape=shape)
    refused_unchanged(capsys, place, [command[0], model, *command[1:]], str(model), "input_shape")


@pytest.mark.parametrize("name, needle", [
    ("no_such_model", "unknown model 'no_such_model'"),
    ("torchvision:no_such_model", "unknown torchvision classification model"),
    ("lenet300\x1b[2J\nrm -rf /", "malformed metadata"),
    (5, "malformed metadata"),
    ("x" * 100_000, "malformed metadata"),
])
def test_crafted_model_name(capsys, place, lenet, name, needle):
    model = crafted(lenet, place / "model.pt", model=name)
    err = refused_unchanged(capsys, place, ["eval", model], needle)
    assert len(err) < 2000


@pytest.mark.parametrize("name, options, needle", [
    ("resnet18", {"weights": "IMAGENET1K_V1"}, "weights=None"),
    ("resnet18", {"weights": "IMAGENET1K_V1", "progress": True}, "weights=None"),
    ("resnet18", {"num_classes": 1000}, "may not set num_classes"),
    ("resnet18", {"pretrained": True}, "pretrained"),
    ("resnet50", {"width_per_group": 10**5}, "more than the file"),  # the file is a resnet18
    ("resnet18", {"norm_layer": "os.system"}, "norm_layer"),
])
def test_torchvision_model_options_download_nothing(capsys, place, resnet18, name, options, needle):
    state, masks = resnet18
    model = save_raw(place / "model.pt", state, masks, {
        "model": f"torchvision:{name}", "model_options": options, "num_classes": 10, "input_shape": [3, 32, 32]})
    refused_unchanged(capsys, place, ["eval", model, "--no-accuracy"], needle)
    assert not (place / "torch_home").exists() and not (place / "cache").exists()


def test_a_torchvision_file_that_fits_is_evaluated(capsys, place):
    state, masks = _pruned(build_model("torchvision:squeezenet1_1", 10, [3, 32, 32]))
    model = save_raw(place / "model.pt", state, masks, {
        "model": "torchvision:squeezenet1_1", "model_options": {}, "num_classes": 10, "input_shape": [3, 32, 32]})
    code, out, err = run(capsys, "eval", model, "--no-accuracy", "--json")
    assert code == 0, err
    assert json.loads(out)["model"] == "torchvision:squeezenet1_1"
    assert not (place / "torch_home").exists()


def test_weights_that_do_not_fit_name_both_shapes(capsys, place, lenet):
    state = dict(lenet.state_dict)
    state["3.weight"] = torch.zeros(7, 32)
    masks = {k: v for k, v in lenet.masks.items() if k != "3.weight"}
    model = save_raw(place / "model.pt", state, masks, lenet.meta)
    refused_unchanged(capsys, place, ["eval", model], "3.weight: file (7, 32) vs model (16, 32)")
    state = dict(lenet.state_dict)
    state["extra"] = torch.zeros(3)
    model = save_raw(place / "model.pt", state, lenet.masks, lenet.meta)
    refused_unchanged(capsys, place, ["eval", model], "unexpected keys ['extra']")


# ---------------------------------------------------------------------------------- file formats
def _sparse_file(path: Path, tensors: dict, entries: list, meta: dict | None = None) -> Path:
    from safetensors.torch import save_file

    info = dict(meta or {})
    info["keys"] = entries
    save_file(tensors, str(path), metadata={"probmask": json.dumps(info), "probmask_format": "sparse"})
    return path


def _csr(shape, crow, col, values):
    return ({"csr/w/crow": torch.tensor(crow, dtype=torch.int32), "csr/w/col": torch.tensor(col, dtype=torch.int32),
             "csr/w/values": torch.tensor(values, dtype=torch.float32)},
            [{"name": "w", "shape": shape, "dtype": "torch.float32", "encoding": "csr"}])


@pytest.mark.parametrize("case, needle", [
    (_csr([1, 10**12], [0, 1], [0], [1.0]), "'w'"),  # one row of 10**12 columns, one value
    (_csr([10**6, 10**6], [0, 1, 1], [0], [1.0]), "row pointers for 1000000 rows"),
    (_csr([3, 3], [0, 1, 1, 1], [7], [1.0]), "column index out of range"),
    (_csr([3, 3], [0, 1, 1, 1], [-1], [1.0]), "column index out of range"),
    (_csr([3, -3], [0, 1, 1, 1], [0], [1.0]), "non-negative"),
    (_csr([3, 3.5], [0, 1, 1, 1], [0], [1.0]), "non-negative"),
    (_csr([2] * 40, [0, 1, 1], [0], [1.0]), "at most 8"),
    (({"bitmask/w/bits": torch.zeros(2, dtype=torch.uint8), "bitmask/w/values": torch.zeros(0)},
      [{"name": "w", "shape": [1000, 1000], "encoding": "bitmask"}]), "2 bitmask bytes for 1000000 elements"),
    (({"dense/w": torch.zeros(3)}, [{"name": "w", "shape": [10**6, 10**6], "encoding": "dense"}]),
     "stored tensor has shape [3]"),
    (({"dense/w": torch.zeros(3)}, [{"name": "w", "shape": [3], "encoding": "dense"}] * 2), "twice"),
    (({"dense/w": torch.zeros(3)}, [{"name": "w", "shape": [3], "encoding": "pickle"}]), "unknown encoding"),
])
def test_sparse_files_with_shapes_that_do_not_fit_their_data(tmp_path, case, needle):
    tensors, entries = case
    path = _sparse_file(tmp_path / "m.sparse", tensors, entries)
    with pytest.raises(CheckpointError, match="'w'|pickle") as info:
        export.load(path)
    assert needle in str(info.value)


@pytest.mark.parametrize("columns, needle", [(10**6, "more than 4,294,967,296 elements"),
                                             (4000, "bytes once decoded")])
def test_sparse_file_declaring_far_more_than_it_stores(capsys, place, columns, needle):
    """Row pointers for 10**6 rows are stored (4 MB), the columns of each are not."""
    crow = torch.zeros(10**6 + 1, dtype=torch.int32)
    crow[1:] = 1
    tensors = {"csr/w/crow": crow, "csr/w/col": torch.zeros(1, dtype=torch.int32), "csr/w/values": torch.ones(1)}
    path = _sparse_file(place / "m.sparse.safetensors", tensors,
                        [{"name": "w", "shape": [10**6, columns], "encoding": "csr"}],
                        {"model": "lenet300", "num_classes": 10, "input_shape": [1, 28, 28]})
    with pytest.raises(CheckpointError, match="'w'"):
        export.load(path)
    refused_unchanged(capsys, place, ["eval", path], needle, "'w'")
    refused_unchanged(capsys, place, ["export", path, "--format", "pt", "--out", place / "x.pt"], "'w'")


def test_sparse_file_that_fits_still_loads(tmp_path):
    tensors, entries = _csr([3, 4], [0, 1, 1, 2], [3, 0], [5.0, 6.0])
    back = export.load(_sparse_file(tmp_path / "m.sparse", tensors, entries))
    expected = torch.zeros(3, 4)
    expected[0, 3], expected[2, 0] = 5.0, 6.0
    assert torch.equal(back.state_dict["w"], expected) and torch.equal(back.masks["w"], expected != 0)


@pytest.mark.parametrize("keys", [5, "abc", [{"name": 1}, {"name": "2.bias"}], [None], {"a": 1}])
def test_crafted_key_tables_of_a_safetensors_file(capsys, place, lenet, keys):
    from safetensors.torch import save_file

    meta = {**lenet.meta, "keys": keys}
    tensors = {**lenet.state_dict, **{f"masks/{k}": v for k, v in lenet.masks.items()}}
    path = place / "m.safetensors"
    save_file(tensors, str(path), metadata={"probmask": json.dumps(meta), "probmask_format": "dense"})
    back = export.load(path)  # the key table only orders the keys
    assert set(back.state_dict) == set(lenet.state_dict)
    path = place / "m.sparse.safetensors"
    save_file(tensors, str(path), metadata={"probmask": json.dumps(meta), "probmask_format": "sparse"})
    with pytest.raises(CheckpointError):
        export.load(path)
    refused_unchanged(capsys, place, ["eval", path], str(path))


def test_deeply_nested_metadata(tmp_path, lenet):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file(dict(lenet.state_dict), str(path), metadata={"probmask": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(CheckpointError, match="nested too deeply"):
        export.load(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should never run",))


def test_pickled_objects_are_refused_without_torchs_advice(capsys, place):
    path = place / "evil.pt"
    torch.save({"state_dict": {}, "masks": {}, "meta": {"x": _Evil()}}, path)
    with pytest.raises(CheckpointError) as info:
        export.load(path)
    message = str(info.value)
    assert "objects other than tensors and plain values" in message and "does not load those" in message
    assert "weights_only" not in message and "trust" not in message
    refused_unchanged(capsys, place, ["eval", path], "does not load those")


def test_legacy_pt_files_are_refused(tmp_path):
    """The pre-1.6 format allocates each storage's declared size before reading it."""
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(4)}}, buf, _use_new_zipfile_serialization=False)
    (tmp_path / "old.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="legacy"):
        export.load(tmp_path / "old.pt")


# ---------------------------------------------------------------------------------- export --out
@pytest.fixture
def model_pt(place, lenet):
    return export.save_pt(lenet, place / "in" / "model.pt")


def test_export_keeps_an_existing_file(capsys, place, model_pt):
    target = place / "out.sparse"
    target.write_text("keep me")
    refused_unchanged(capsys, place, ["export", model_pt, "--format", "sparse", "--out", target],
                      str(target), "--force")
    code, out, err = run(capsys, "export", model_pt, "--format", "sparse", "--out", target, "--force")
    assert code == 0, err
    assert export.detect_format(target) == "sparse"
    assert torch.equal(export.load(target).state_dict["1.weight"], export.load(model_pt).state_dict["1.weight"])


def test_export_default_output_is_not_replaced_silently(capsys, place, model_pt):
    code, out, err = run(capsys, "export", model_pt.parent, "--format", "safetensors")
    assert code == 0, err
    refused_unchanged(capsys, place, ["export", model_pt.parent, "--format", "safetensors"],
                      "export/model.safetensors exists", "--force", "--out")
    code, out, err = run(capsys, "export", model_pt.parent, "--format", "safetensors", "--force")
    assert code == 0, err


def test_export_to_a_folder_or_under_a_file(capsys, place, model_pt):
    (place / "folder").mkdir()
    refused_unchanged(capsys, place, ["export", model_pt, "--format", "pt", "--out", place / "folder"],
                      "is a folder", "file path")
    (place / "file").write_text("x")
    for out in (place / "file" / "m.pt", place / "file" / "deeper" / "m.pt"):
        refused_unchanged(capsys, place, ["export", model_pt, "--format", "pt", "--out", out],
                          str(out), f"{place / 'file'} is a file, not a folder")


def test_export_into_an_unwritable_folder(capsys, place, model_pt, monkeypatch):
    (place / "ro").mkdir()
    if os.geteuid() == 0:  # root writes anywhere: have os.access answer as for another user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == place / "ro" else real(p, mode))
    else:
        (place / "ro").chmod(0o500)
    try:
        refused_unchanged(capsys, place, ["export", model_pt, "--format", "pt", "--out", place / "ro" / "new" / "m.pt"],
                          "folder", "is not writable", str(place / "ro"))
    finally:
        (place / "ro").chmod(0o700)


def test_a_failed_export_leaves_no_folder(capsys, place, lenet):
    """A weight that is nonzero outside its mask cannot be written sparse: nothing is left behind."""
    state = dict(lenet.state_dict)
    state["1.weight"] = torch.ones_like(state["1.weight"])
    model = save_raw(place / "model.pt", state, lenet.masks, lenet.meta)
    refused_unchanged(capsys, place, ["export", model, "--format", "sparse", "--out", place / "new" / "sub" / "m.sparse"],
                      "nonzero where its mask is False")
