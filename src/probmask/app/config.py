"""The experiment configuration: typed dataclasses, YAML files and dotted ``key=value`` overrides.

The dataclass defaults are the default job (LeNet-300-100 on the bundled MNIST subset at 99%
sparsity, ``configs/mnist5k_lenet300.yaml``). A YAML file and the overrides are merged onto them
with OmegaConf structured configs, so an unknown key or a value of the wrong type is an error
naming the key, never silently ignored. :func:`validate` checks value ranges; names of models,
data sets and methods are checked by their registries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from probmask.app.errors import UserError
from probmask.budget import check_sparsity

__all__ = [
    "DataConfig",
    "ExperimentConfig",
    "FinetuneConfig",
    "ModelConfig",
    "PruneConfig",
    "TrainConfig",
    "config_diff",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "validate",
]


@dataclass
class ModelConfig:
    name: str = "lenet300"  # a registered model (see probmask.app.models) or "torchvision:NAME"
    width: int | None = None  # base channel width: resnet32 32 (16 = classic), vgg19_bn 64; None = default
    options: dict[str, Any] = field(default_factory=dict)  # further keyword arguments of the model builder


@dataclass
class DataConfig:
    name: str = "mnist5k"  # mnist5k (bundled), mnist, fashion_mnist, cifar10, cifar100, imagenet
    root: str = "data"  # folder holding the torchvision data sets, or ImageNet's train/ and val/
    download: bool = False  # let torchvision download mnist / fashion_mnist / cifar10 / cifar100
    num_workers: int = 0  # DataLoader worker processes
    train_size: int | None = None  # use a fixed random subset of this many training examples
    test_size: int | None = None  # ... and of test examples (quick experiments)
    image_size: int = 224  # ImageNet crop size


@dataclass
class TrainConfig:
    """The main phase: weights and scores trained together."""

    epochs: int = 60  # LeNet-300-100 on mnist5k: see configs/mnist5k_lenet300.yaml
    batch_size: int = 16  # small batches: more score steps per epoch (see configs/mnist5k_lenet300.yaml)
    lr: float = 0.1  # weights: SGD with momentum, cosine decay
    momentum: float = 0.9
    weight_decay: float = 5e-4
    score_lr: float = 0.03  # scores: Adam without weight decay, cosine decay
    samples: int = 1  # K mask samples per minibatch (the paper: 2; see configs/mnist5k_lenet300.yaml)
    grad_clip: float = 3.0  # clip the joint gradient norm of weights and scores; 0 disables


@dataclass
class PruneConfig:
    method: str = "probmask"  # a registered method (see probmask.app.methods)
    sparsity: float = 0.99  # fraction of prunable weights removed, in (0, 1)
    freeze_weights: bool = False  # supermask mode: only the scores train, weights stay at init
    fix: str = "topk"  # how the final mask is fixed: "topk" (highest scores) or "sample" (best of N)
    fix_samples: int = 10  # N for fix=sample
    fix_batches: int | None = None  # training batches that score each sample (None: all)
    floor: Any = "auto"  # per-layer minimum kept: "auto", "unit", an int, a fraction, or null
    score_init: float = 1.0  # initial keep-probability
    budget_start: float = 0.16  # the budget starts shrinking at this fraction of the epochs
    budget_end: float = 0.6  # ... and reaches 1 - sparsity here
    final_temperature: float = 0.03  # temperature at the end (inverse temperature 1/0.03 ~ 33)
    mask_interval: int = 10  # gmp / gmp_uniform: optimizer steps between magnitude mask updates
    include: list[str] = field(default_factory=list)  # extra parameter-name patterns to prune
    exclude: list[str] = field(default_factory=list)  # parameter-name patterns kept dense


@dataclass
class FinetuneConfig:
    """After fixing the mask: the weights are finetuned under the fixed mask."""

    epochs: int = 10
    lr: float = 0.01  # SGD with momentum, cosine decay
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class ExperimentConfig:
    seed: int = 0
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N
    # PyTorch CPU threads during the run (null: PyTorch's default, one per core). One is the robust
    # choice for small models: on a busy 2-core machine a LeNet-300-100 step measured 14x slower
    # with two threads than with one; on an idle one two were 25% faster.
    threads: int | None = 1
    bf16: bool = False  # bfloat16 autocast of the forward pass (CUDA or CPU); params, scores stay float32
    compile: bool = False  # torch.compile the training forward pass (needs a C++ compiler on the CPU)
    tensorboard: bool = False  # also write TensorBoard scalars (needs the tensorboard package)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    """OmegaConf's first line plus the key it concerns."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    key = getattr(err, "full_key", None)
    if key and key not in first:
        return f"{first} (key {key})"
    return first


def _merge(base: Any, *others: Any, where: str) -> Any:
    try:
        return OmegaConf.merge(base, *others)
    except OmegaConfBaseException as err:
        raise UserError(f"{where}: {_omegaconf_message(err)}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise UserError(f"config file {path} is a directory: pass a YAML file")
    if not path.exists():
        raise UserError(f"config file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                        f"{err.start}): save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys (like 'train: {{epochs: 5}}'), "
                        f"not a {type(data).__name__}")
    return data


def _parse_overrides(overrides: Sequence[str]) -> Any:
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or not key.strip():
            raise UserError(f"override {item!r} must look like key=value (e.g. train.epochs=5)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise UserError(f"overrides: {_omegaconf_message(err)}") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The defaults, then the YAML file ``path`` (if any), then the ``key=value`` overrides; validated."""
    merged = OmegaConf.structured(ExperimentConfig)
    if path is not None:
        merged = _merge(merged, _read_yaml(Path(path)), where=f"config file {path}")
    if overrides:
        merged = _merge(merged, _parse_overrides(overrides), where="overrides")
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ExperimentConfig)
    validate(cfg)
    return cfg


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain nested dicts, lists and scalars (JSON- and ``weights_only``-safe)."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def config_from_dict(data: Mapping[str, Any], where: str = "saved config") -> ExperimentConfig:
    """The inverse of :func:`config_to_dict`, with the same key and type checks as a YAML file."""
    merged = _merge(OmegaConf.structured(ExperimentConfig), dict(data), where=where)
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ExperimentConfig)
    return cfg


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_diff(a: ExperimentConfig, b: ExperimentConfig) -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ, with both values."""

    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in d.items():
            if isinstance(value, Mapping) and value and key != "options":
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    fa, fb = flat(config_to_dict(a)), flat(config_to_dict(b))
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate(cfg: ExperimentConfig) -> None:
    """Range checks of every value; raises :class:`UserError` naming the key and the fix."""
    t, p, f, d = cfg.train, cfg.prune, cfg.finetune, cfg.data
    try:
        check_sparsity(p.sparsity)
    except ValueError as err:
        raise UserError(f"prune.{err}") from None
    _check(t.epochs >= 1, f"train.epochs must be at least 1, got {t.epochs}")
    _check(t.batch_size >= 1, f"train.batch_size must be at least 1, got {t.batch_size}")
    _check(t.samples >= 1, f"train.samples (K mask samples per batch) must be at least 1, got {t.samples}")
    for key, value in (("train.lr", t.lr), ("train.score_lr", t.score_lr), ("finetune.lr", f.lr)):
        _check(math.isfinite(value) and value >= 0, f"{key} must be a non-negative number, got {value}")
    for key, value in (("train.momentum", t.momentum), ("finetune.momentum", f.momentum)):
        _check(0.0 <= value < 1.0, f"{key} must lie in [0, 1), got {value}")
    for key, value in (("train.weight_decay", t.weight_decay), ("finetune.weight_decay", f.weight_decay)):
        _check(value >= 0, f"{key} must be >= 0, got {value}")
    _check(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables clipping), got {t.grad_clip}")
    _check(f.epochs >= 0, f"finetune.epochs must be >= 0, got {f.epochs}")
    _check(p.fix in ("topk", "sample"), f"prune.fix must be 'topk' or 'sample', got {p.fix!r}")
    _check(p.fix_samples >= 1, f"prune.fix_samples must be at least 1, got {p.fix_samples}")
    _check(p.fix_batches is None or p.fix_batches >= 1,
           f"prune.fix_batches must be at least 1 or null (all), got {p.fix_batches}")
    _check(0.0 <= p.score_init <= 1.0, f"prune.score_init is a probability in [0, 1], got {p.score_init}")
    _check(0.0 <= p.budget_start <= p.budget_end <= 1.0,
           f"need 0 <= prune.budget_start <= prune.budget_end <= 1 (fractions of train.epochs), "
           f"got {p.budget_start} and {p.budget_end}")
    _check(p.mask_interval >= 1, f"prune.mask_interval must be at least 1 (steps), got {p.mask_interval}")
    _check(0.0 < p.final_temperature <= 1.0,
           f"prune.final_temperature must lie in (0, 1], got {p.final_temperature}")
    _check(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    for key, value in (("data.train_size", d.train_size), ("data.test_size", d.test_size)):
        _check(value is None or value >= 1, f"{key} must be at least 1 or null (all), got {value}")
    _check(d.image_size >= 8, f"data.image_size must be at least 8, got {d.image_size}")
    _check(cfg.model.width is None or cfg.model.width >= 1, f"model.width must be at least 1, got {cfg.model.width}")
    _check(cfg.threads is None or cfg.threads >= 1, f"threads must be at least 1 or null (PyTorch's default), got {cfg.threads}")
    device = cfg.device
    _check(device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()),
           f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
