"""The relaxation: values, gradients (gradcheck in float64), stability at scores 0 and 1."""

import torch

from probmask.masks import EPS, relaxed_mask, relaxed_masked_weight


def plain_relaxed_mask(score, noise, temperature):
    """The specification, written with plain autograd ops."""
    logit_s = torch.log(score + EPS) - torch.log(1 - score + EPS)
    logit_u = torch.log(noise + EPS) - torch.log(1 - noise + EPS)
    return torch.sigmoid((logit_s + logit_u) * temperature)


def test_values_and_gradient_match_the_specification():
    gen = torch.Generator().manual_seed(0)
    score = torch.rand(50, generator=gen, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_()
    noise = torch.rand(50, generator=gen, dtype=torch.float64)
    for temperature in (1.0, 3.0):
        ours = relaxed_mask(score, noise, temperature)
        spec = plain_relaxed_mask(score, noise, temperature)
        torch.testing.assert_close(ours, spec)
        g_ours = torch.autograd.grad(ours.sum(), score)[0]
        g_spec = torch.autograd.grad(spec.sum(), score)[0]
        torch.testing.assert_close(g_ours, g_spec)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    score = torch.rand(20, generator=gen, dtype=torch.float64).clamp(0.1, 0.9).requires_grad_()
    noise = torch.rand(20, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: relaxed_mask(s, noise, 2.0), (score,))


def test_fused_weight_gradients_match_unfused():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    score = torch.rand(6, 5, generator=gen, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_()
    torch.manual_seed(3)
    fused = relaxed_masked_weight(weight, score, 1.5)
    gw, gs = torch.autograd.grad((fused * torch.arange(30.0).view(6, 5)).sum(), (weight, score))
    # same noise: re-draw with the same seed
    torch.manual_seed(3)
    noise = torch.rand_like(score)
    mask = plain_relaxed_mask(score, noise, 1.5)
    plain = weight * mask
    torch.testing.assert_close(fused, plain)
    gw2, gs2 = torch.autograd.grad((plain * torch.arange(30.0).view(6, 5)).sum(), (weight, score))
    torch.testing.assert_close(gw, gw2)
    torch.testing.assert_close(gs, gs2)


def test_stable_at_zero_and_one():
    score = torch.tensor([0.0, 1.0, 0.0, 1.0], requires_grad=True)
    noise = torch.tensor([0.5, 0.5, 0.999, 0.001])
    mask = relaxed_mask(score, noise, 1.0)
    (grad,) = torch.autograd.grad(mask.sum(), score)
    assert torch.isfinite(mask).all() and torch.isfinite(grad).all()
    assert mask[0] < 1e-6 and mask[1] > 1 - 1e-6
    # at exactly 1 the naive m * (1 - m) form rounds to 0; ours keeps a real gradient
    assert grad[1] > 0.5
    naive = plain_relaxed_mask(score, noise, 1.0)
    (naive_grad,) = torch.autograd.grad(naive.sum(), score)
    assert naive_grad[1] == 0


def test_float32_weight_at_extreme_scores_has_finite_gradients():
    weight = torch.randn(1000, requires_grad=True)
    score = torch.cat([torch.zeros(500), torch.ones(500)]).requires_grad_()
    out = relaxed_masked_weight(weight, score, 30.0)
    out.pow(2).sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(weight.grad).all() and torch.isfinite(score.grad).all()


def test_relaxed_mask_keeps_with_probability_score():
    # P(sigmoid((logit s + L) T) > 1/2) = P(L > -logit s) = s, for every temperature
    noise = torch.rand(200_000, generator=torch.Generator().manual_seed(4))
    for value in (0.05, 0.3, 0.8):
        score = torch.full((200_000,), value)
        for temperature in (1.0, 200.0):
            mask = relaxed_mask(score, noise, temperature)
            assert abs(float((mask > 0.5).float().mean()) - value) < 0.005
    # high temperature makes it nearly binary
    mask = relaxed_mask(torch.full((10_000,), 0.5), noise[:10_000], 200.0)
    assert float(((mask > 0.01) & (mask < 0.99)).float().mean()) < 0.05


def test_float32_flat_sampling_matches_float64_specification():
    """The fused float32 PyTorch path (one log of the odds product, capped) against the
    specification in float64, on the same noise, at scores 0, 1, tiny and interior, and
    temperatures 1 to 33. (tests/test_native.py holds the compiled kernels to the same.)"""
    from probmask.masks import relaxed_masked_weights

    gen = torch.Generator().manual_seed(5)
    score = torch.cat([torch.zeros(300), torch.ones(300), torch.full((300,), 1e-9),
                       torch.rand(3000, generator=gen)])
    weight = torch.ones_like(score)
    for temperature in (1.0, 4.0, 33.0):
        torch.manual_seed(6)
        (masked,) = relaxed_masked_weights(score, [weight], temperature, fused=False)
        torch.manual_seed(6)
        noise = torch.rand_like(score)  # the same draw, in float64 below
        spec = plain_relaxed_mask(score.double(), noise.double().clamp_min(EPS), temperature)
        torch.testing.assert_close(masked.double(), spec, atol=2e-6, rtol=0)
