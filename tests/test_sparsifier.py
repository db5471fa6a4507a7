"""ProbMask on real module types and models: selection, modes, fixing, finalize, state, errors."""

import math

import pytest
import torch
import torchvision
from torch import nn

import probmask
from probmask import MaskMode, ProbMask


def lenet300():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )


def train_a_little(pm, model, make_loss, steps=5, epochs=(3, 4)):
    weights = pm.weight_parameters()  # none in supermask mode
    opts = [torch.optim.Adam(pm.score_parameters(), lr=0.05)]
    if weights:
        opts.append(torch.optim.SGD(weights, lr=0.05, momentum=0.9))
    pm.set_epoch(*epochs)
    model.train()
    for _ in range(steps):
        for opt in opts:
            opt.zero_grad()
        probmask.accumulate_samples(make_loss, 2)
        for opt in opts:
            opt.step()
        pm.project()


class TinyLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 24, num_layers=2, batch_first=True)
        self.gru = nn.GRU(24, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.lstm(self.embed(x))
        h, _ = self.gru(h)
        return self.head(h[:, -1])


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3)
        self.t1 = nn.ConvTranspose1d(4, 2, 3)

    def forward(self, x):
        return self.t1(torch.relu(self.c1(x)))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv3d(1, 3, 3, padding=1)
        self.t = nn.ConvTranspose3d(3, 1, 2, stride=2)
        self.t2 = nn.ConvTranspose2d(1, 2, 3)

    def forward(self, x):
        y = self.t(torch.relu(self.c(x)))
        return self.t2(y[:, :, 0])


def transformer():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(), nn.Linear(16 * 5, 4))


CASES = {
    # name: (model factory, input factory, ProbMask kwargs, expected prunable parameter names)
    "mlp": (lenet300, lambda: torch.randn(8, 1, 28, 28), {}, ["1.weight", "3.weight", "5.weight"]),
    "conv1d_transpose1d": (Conv1dNet, lambda: torch.randn(4, 2, 10), {}, ["c1.weight", "t1.weight"]),
    "conv3d_transpose3d_2d": (
        Conv3dNet, lambda: torch.randn(2, 1, 4, 4, 4), {}, ["c.weight", "t.weight", "t2.weight"]
    ),
    "lstm_gru_embedding": (
        TinyLSTM,
        lambda: torch.randint(0, 50, (4, 7)),
        {"include": ["embed.weight", "lstm.weight_*", "gru.weight_ih_l0"], "sparsity": 0.8},
        ["embed.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_ih_l1",
         "lstm.weight_hh_l1", "gru.weight_ih_l0", "head.weight"],
    ),
    "transformer": (
        transformer,
        lambda: torch.randn(3, 5, 16),
        {"include": "*.in_proj_weight", "sparsity": 0.8},
        None,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_types_train_fix_and_finalize(case):
    torch.manual_seed(0)
    factory, make_input, kwargs, names = CASES[case]
    model = factory()
    x = make_input()
    with torch.no_grad():
        reference = model(x)
    kwargs = dict(kwargs)
    sparsity = kwargs.pop("sparsity", 0.9)
    pm = ProbMask(model, sparsity, **kwargs)
    if names is not None:
        assert [t.name for t in pm.targets] == names
    if case == "transformer":
        selected = [t.name for t in pm.targets]
        assert any(n.endswith("self_attn.in_proj_weight") for n in selected)
        assert any(n.endswith("self_attn.out_proj.weight") for n in selected)
        assert any(n.endswith("linear1.weight") for n in selected)

    def loss():
        return model(x).float().pow(2).mean()

    train_a_little(pm, model, loss)
    assert pm.scores.grad is not None and torch.isfinite(pm.scores.grad).all()
    assert float(pm.scores.detach().sum()) <= pm.budget * (1 + 1e-6)
    pm.fix_mask("topk")
    model.eval()
    with torch.no_grad():
        masked = model(x)
    small = pm.finalize()
    assert small is model and type(small) is type(factory())
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in small.modules())
    assert list(small.state_dict()) == list(factory().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked)
    zeros = sum(int((small.get_parameter(t.name) == 0).sum()) for t in pm.targets)
    assert zeros >= pm.total - pm.target_kept
    assert reference.shape == masked.shape


def test_resnet50_unmodified():
    model = torchvision.models.resnet50(weights=None, num_classes=10)
    pm = ProbMask(model, 0.9, exclude=["conv1.weight", "fc.weight"])
    assert len(pm.targets) == 52  # 53 convs + fc, minus the two kept dense
    assert pm.total == sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"
    )
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_one_mask_sample_per_forward_even_if_read_twice():
    class TwoReads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(50, 50)

        def forward(self, x):
            return self.fc.weight.clone(), self.fc.weight.clone()

    model = TwoReads()
    pm = ProbMask(model, 0.5, floor=None)
    with torch.no_grad():
        pm.scores.fill_(0.5)
    for train in (True, False):
        model.train(train)
        a, b = model(None)
        assert torch.equal(a, b)
        c, _ = model(None)
        assert not torch.equal(a, c)  # a new forward draws a new sample


def test_modes_follow_train_eval_and_fix():
    model = lenet300()
    pm = ProbMask(model, 0.9)
    assert pm.mode is MaskMode.RELAXED
    model.eval()
    assert pm.mode is MaskMode.SAMPLED
    with torch.no_grad():
        pm.scores.fill_(0.3)
        w = model[1].weight
        kept = (w != 0).float().mean()
    assert abs(float(kept) - 0.3) < 0.02  # hard Bernoulli sample
    with pm.use_mode(MaskMode.RELAXED):
        assert pm.mode is MaskMode.RELAXED
    pm.fix_mask("topk")
    assert pm.mode is MaskMode.FIXED
    with torch.no_grad():
        first, second = model[1].weight.clone(), model[1].weight.clone()
    assert torch.equal(first, second)


def test_supermask_freezes_weights_and_trains_scores():
    torch.manual_seed(0)
    model = lenet300()
    before = model[1].weight.detach().clone()
    pm = ProbMask(model, 0.5, freeze_weights=True)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    assert pm.weight_parameters() == []  # nothing of the model trains, biases included
    bias = model[1].bias.detach().clone()
    train_a_little(pm, model, lambda: nn.functional.cross_entropy(model(x), y))
    assert torch.equal(pm._original(0), before)
    assert torch.equal(model[1].bias, bias)
    assert float((pm.scores < 1).float().mean()) > 0.1  # scores moved
    pm.fix_mask("topk")
    pm.finalize()
    assert model[1].weight.requires_grad  # original flag restored


def test_dense_phase_scores_get_gradients_at_one():
    model = lenet300()
    pm = ProbMask(model, 0.99)
    pm.set_epoch(0, 10)  # budget not binding, T = 1
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    nn.functional.cross_entropy(model(x), y).backward()
    assert torch.equal(pm.scores.detach(), torch.ones_like(pm.scores))
    assert float((pm.scores.grad != 0).float().mean()) > 0.5


def test_fix_mask_sample_picks_best_and_meets_budget():
    torch.manual_seed(0)
    model = lenet300()
    pm = ProbMask(model, 0.95)
    with torch.no_grad():
        pm.scores.uniform_(0, 0.2)
    seen = []

    def score_fn():
        value = float(torch.rand(()))
        seen.append((value, pm.fixed_mask.clone()))
        return value

    mask = pm.fix_mask("sample", num_samples=5, score_fn=score_fn)
    best_value, best_mask = max(seen, key=lambda t: t[0])
    assert len(seen) == 5 and torch.equal(mask, best_mask)
    assert int(mask.sum()) <= pm.target_kept
    report = pm.report()
    assert report.fixed and report.kept <= pm.target_kept
    for layer in report.layers:
        assert layer.kept >= layer.floor


def test_floors_default_and_binding_reported():
    model = lenet300()
    pm = ProbMask(model, 0.99)
    assert pm.floors == [300, 100, 10]  # one per output unit: 410 of a budget of 2662
    # at 99.9% (budget 266) they are scaled to fit in half the budget, never below 1
    assert ProbMask(lenet300(), 0.999).floors == [97, 32, 3]
    pm2 = ProbMask(lenet300(), 0.99, floor="unit")
    assert pm2.floors == [300, 100, 10]
    # a layer with hopeless scores is held at its floor, and the report says so
    with torch.no_grad():
        pm2.scores.fill_(1.0)
        pm2.scores[-1000:] = 0.0
    pm2.set_epoch(9, 10)
    pm2.project()
    report = pm2.report()
    assert report.layers[2].floor_binding and report.layers[2].kept == pytest.approx(10, abs=1e-3)
    assert "binding" in report.format()
    with torch.no_grad():
        pm2.scores[:-1000].uniform_(0.2, 1.0)  # the other layers clearly better than layer 2
    pm2.fix_mask("topk")
    fixed = pm2.report()
    assert fixed.layers[2].kept == 10 and fixed.layers[2].floor_binding
    assert fixed.kept == pm2.target_kept


def test_report_totals_and_dict():
    model = lenet300()
    pm = ProbMask(model, 0.9)
    pm.fix_mask("topk")
    report = pm.report()
    assert report.total == 266200 and report.kept == pm.target_kept == math.floor(0.1 * 266200)
    d = report.to_dict()
    assert d["sparsity"] == pytest.approx(0.9, abs=1e-5)
    assert [layer["name"] for layer in d["layers"]] == ["1.weight", "3.weight", "5.weight"]
    assert "total" in report.format()


def test_state_dict_round_trip_resumes_identically():
    def run(steps_before, steps_after, via_state):
        torch.manual_seed(0)
        model = lenet300()
        pm = ProbMask(model, 0.95)
        x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
        loss = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
        opt_s = torch.optim.Adam(pm.score_parameters(), lr=0.05)
        opt_w = torch.optim.SGD(pm.weight_parameters(), lr=0.05)

        def steps(count, epoch):
            pm.set_epoch(epoch, 4)
            for _ in range(count):
                opt_s.zero_grad()
                opt_w.zero_grad()
                loss().backward()
                opt_s.step()
                opt_w.step()
                pm.project()

        steps(steps_before, 2)
        if via_state:
            state = (pm.state_dict(), model.state_dict(), opt_s.state_dict(), opt_w.state_dict(),
                     torch.get_rng_state())
            torch.manual_seed(123)
            model = lenet300()
            pm = ProbMask(model, 0.95)
            model.load_state_dict(state[1])
            pm.load_state_dict(state[0])
            opt_s = torch.optim.Adam(pm.score_parameters(), lr=0.05)
            opt_w = torch.optim.SGD(pm.weight_parameters(), lr=0.05)
            opt_s.load_state_dict(state[2])
            opt_w.load_state_dict(state[3])
            torch.set_rng_state(state[4])
            assert pm.epoch == 2
        steps(steps_after, 3)
        return pm.scores.detach().clone()

    straight = run(3, 3, via_state=False)
    resumed = run(3, 3, via_state=True)
    torch.testing.assert_close(straight, resumed, atol=0, rtol=0)


def test_state_of_fixed_mask_round_trips():
    model = lenet300()
    pm = ProbMask(model, 0.9)
    pm.fix_mask("topk")
    state = pm.state_dict()
    pm2 = ProbMask(lenet300(), 0.9)
    pm2.load_state_dict(state)
    assert pm2.mode is MaskMode.FIXED and torch.equal(pm2.fixed_mask, pm.fixed_mask)


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="sparsity .* must lie in \\(0, 1\\)"):
        ProbMask(lenet300(), sparsity)


def test_no_prunable_weights():
    with pytest.raises(ValueError, match="no prunable weights"):
        ProbMask(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), 0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"include": "nothing.*"}, "include pattern"),
        ({"exclude": "conv99.weight"}, "exclude pattern 'conv99.weight' matches no prunable"),
        ({"floor": "unit", "sparsity": 0.999}, "floors keep"),
        ({"floor": -3}, "floor must be"),
        ({"score_init": 1.5}, "score_init"),
    ],
)
def test_bad_options(kwargs, message):
    kwargs = dict(kwargs)
    sparsity = kwargs.pop("sparsity", 0.9)
    with pytest.raises(ValueError, match=message):
        ProbMask(lenet300(), sparsity, **kwargs)


def test_nan_weights_at_projection():
    model = lenet300()
    pm = ProbMask(model, 0.9)
    with torch.no_grad():
        pm._original(1)[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf in the weights .*3.weight"):
        pm.project()


def test_nan_scores_at_projection():
    pm = ProbMask(lenet300(), 0.9)
    with torch.no_grad():
        pm.scores[5] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf in the scores"):
        pm.project()


def test_loading_state_of_another_model():
    pm = ProbMask(lenet300(), 0.9)
    other = ProbMask(nn.Sequential(nn.Linear(784, 10)), 0.9)
    with pytest.raises(ValueError, match="belongs to a different model"):
        other.load_state_dict(pm.state_dict())


def test_finalize_needs_fixed_mask_and_happens_once():
    pm = ProbMask(lenet300(), 0.9)
    with pytest.raises(ValueError, match="call fix_mask"):
        pm.finalize()
    pm.fix_mask("topk")
    pm.finalize()
    with pytest.raises(RuntimeError, match="finalized"):
        pm.project()


def test_scores_on_other_device_are_reported():
    model = lenet300()
    pm = ProbMask(model, 0.9)
    pm.scores = pm.scores.detach().to(torch.float32).requires_grad_()  # same device: fine
    model(torch.randn(2, 1, 28, 28))
    pm.scores = torch.ones(pm.total, device="meta")
    with pytest.raises(RuntimeError, match="move the model before creating ProbMask"):
        model(torch.randn(2, 1, 28, 28))


def test_readme_library_example_runs_verbatim():
    """The README's first Python block, as written, on a small model and loader it assumes."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## The library in your own training loop", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    model = lenet300()
    data = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(3)]
    env = {"model": model, "loader": data, "loss_fn": nn.functional.cross_entropy, "epochs": 3}
    exec(compile(block, "README.md", "exec"), env)
    pm = env["pm"]
    assert env["small"] is model and not hasattr(model[1], "parametrizations")
    kept = sum(int(torch.count_nonzero(model.get_parameter(t.name))) for t in pm.targets)
    assert kept == pm.target_kept == int(0.01 * pm.total + 1e-6)
