"""Mask fixing: exact budgets and floors, however the scores look."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probmask.fixing import repair_mask, sample_mask, topk_mask


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(1, 30), min_size=1, max_size=4),
    st.floats(0.0, 1.0),
    st.integers(0, 2**31 - 1),
)
def test_topk_and_samples_meet_budget_and_floors(sizes, fraction, seed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    scores = torch.rand(n, generator=gen)
    scores[torch.rand(n, generator=gen) < 0.3] = 1.0  # ties
    floors = [min(1, size) for size in sizes]
    k = max(sum(floors), int(fraction * n))
    for mask in (topk_mask(scores, k, sizes, floors), sample_mask(scores, k, sizes, floors, gen)):
        assert mask.dtype == torch.bool and mask.shape == (n,)
        assert int(mask.sum()) <= k
        for part, fl in zip(mask.split(sizes), floors):
            assert int(part.sum()) >= fl
    assert int(topk_mask(scores, k, sizes, floors).sum()) == k


def test_topk_keeps_highest_scores():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2])
    mask = topk_mask(scores, 2, [5], [0])
    assert mask.tolist() == [False, True, False, True, False]


def test_topk_is_deterministic_under_ties():
    scores = torch.ones(10)
    a = topk_mask(scores, 4, [10], [0])
    b = topk_mask(scores, 4, [10], [0])
    assert torch.equal(a, b) and a.tolist()[:4] == [True] * 4


def test_repair_drops_lowest_scores_and_adds_floors():
    scores = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.05, 0.3])
    sampled = torch.tensor([True, True, True, True, False, False])
    out = repair_mask(sampled, scores, 3, [4, 2], [0, 1])
    # layer 1's floor adds its best weight (0.3); then two of the others must go: 0.1 and 0.2
    assert out.tolist() == [True, True, False, False, False, True]


def test_sampling_exceeding_budget_is_trimmed():
    scores = torch.full((1000,), 0.5)
    mask = sample_mask(scores, 100, [1000], [0], torch.Generator().manual_seed(0))
    assert int(mask.sum()) == 100  # a raw Bernoulli(0.5) sample keeps ~500
