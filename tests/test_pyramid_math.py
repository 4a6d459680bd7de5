"""Pyramidal flow matching math: stage windows, endpoint chaining through the renoise correction, unit variance of
the corrected noise, the velocity target as the derivative of the path, and exact sampling of a point mass."""

import math

import pytest
import torch

from fastpost.models.pyramid.packing import Segment, pack, pad_batch, segment_positions, unpack_segment
from fastpost.models.pyramid.pyramid import (
    StageSchedule, block_noise, down, down_noise, frame_units, history_stages, interpolate, renoise,
    renoise_coefficients, stage_endpoints, up, velocity,
)
from fastpost.models.pyramid.sampling import PyramidSampleConfig, sample


def test_paper_stage_windows():
    sched = StageSchedule()  # thirds, gamma = 1/3
    assert sched.num_stages == 3 and [sched.level(k) for k in range(3)] == [2, 1, 0]
    ends = [sched.sigma_end(k) for k in range(3)]
    starts = [sched.sigma_start(k) for k in range(3)]
    assert ends == pytest.approx([2 / 3, 1 / 3, 0.0], abs=1e-12)
    # gamma = 1/3: sigma_start = 2 sigma_end / (1 + sigma_end) (the paper's s = 2e/(1+e) in tau = 1 - sigma)
    assert starts == pytest.approx([1.0, 0.8, 0.5], abs=1e-12)
    for k in (1, 2):
        alpha, beta, s = renoise_coefficients(ends[k - 1], 1 / 3)
        tau = 1 - s
        assert alpha == pytest.approx((1 + tau) / 2) and beta == pytest.approx(math.sqrt(3) * (1 - tau) / 2)
    # any gamma: the signal coefficient survives the jump, alpha (1 - sigma_end) = 1 - sigma_start
    for gamma in (0.1, 0.25, 1 / 3):
        for se in (0.0, 0.2, 0.5, 0.9, 1.0):
            alpha, _, s = renoise_coefficients(se, gamma)
            assert alpha * (1 - se) == pytest.approx(1 - s, abs=1e-12) and 0 <= s <= 1
    assert sched.sigmas(1, 4).tolist() == pytest.approx([0.8, 0.8 - 7 / 60, 0.8 - 14 / 60, 0.45, 1 / 3], abs=1e-12)
    with pytest.raises(ValueError, match="stage_range"):
        StageSchedule((0.0, 0.5, 0.4, 1.0))
    with pytest.raises(ValueError, match="gamma"):
        StageSchedule(gamma=0.5)


@pytest.mark.parametrize("stage_range", [(0.0, 1 / 3, 2 / 3, 1.0), (0.0, 0.2, 0.5, 0.7, 1.0)], ids=["K3", "K4"])
def test_stage_end_renoised_is_next_stage_start_exactly(stage_range):
    """gamma = 1/3 with the coupled noise pyramid: Up(end_k) renoised with n' = (2/sqrt 3)(n_{k+1} - Up(n_k)/2)
    equals start_{k+1} sample by sample; start_0 is the noise, end_{K-1} the data."""
    sched = StageSchedule(stage_range, 1 / 3)
    k_stages = sched.num_stages
    g = torch.Generator().manual_seed(0)
    size = 2 ** (k_stages - 1) * 3
    x0 = torch.randn(2, 4, 3, size, 2 * size, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    start0, _ = stage_endpoints(x0, noise, 0, sched)
    assert torch.equal(start0, down_noise(noise, k_stages - 1))
    _, last_end = stage_endpoints(x0, noise, k_stages - 1, sched)
    assert torch.allclose(last_end, x0, atol=1e-12)
    for k in range(k_stages - 1):
        _, end = stage_endpoints(x0, noise, k, sched)
        start_next, _ = stage_endpoints(x0, noise, k + 1, sched)
        n_k, n_next = down_noise(noise, sched.level(k)), down_noise(noise, sched.level(k + 1))
        # the noise pyramid is coupled: Up(n_k) / 2 is the 2x2 block mean of n_{k+1}, so n' below is exactly the
        # zero-block-mean rest of n_{k+1}, which has the block-noise law (variance 1, correlation -1/3)
        assert torch.allclose(up(n_k) / 2, up(down(n_next)), atol=1e-12)
        n_prime = (2 / math.sqrt(3)) * (n_next - up(n_k) / 2)
        jumped = renoise(end, sched.sigma_end(k), sched.gamma, n_prime)
        assert (jumped - start_next).abs().max().item() < 1e-12, k
        # and without the correction (plain upsampling) the start is not reached
        assert (up(end) - start_next).abs().max().item() > 0.1


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return ((a * b).mean() / (a.std() * b.std())).item()


@pytest.mark.parametrize("gamma", [1 / 3, 0.2])
@pytest.mark.parametrize("sigma_end", [1.0, 2 / 3, 1 / 3])
def test_renoise_makes_white_unit_variance_noise(gamma, sigma_end):
    """The noise part of Up(end) after the correction, divided by sigma_start, is white with unit variance:
    variance 1 and zero correlation between pixels of one 2x2 block (which Up made identical)."""
    g = torch.Generator().manual_seed(int(100 * sigma_end) + int(1000 * gamma))
    n_low = torch.randn(4, 1, 1, 128, 100, generator=g, dtype=torch.float64)  # 51,200 coarse values
    n_block = block_noise((4, 1, 1, 256, 200), gamma, g, torch.float64)  # 204,800 values
    _, _, sigma_start = renoise_coefficients(sigma_end, gamma)
    z = renoise(sigma_end * n_low, sigma_end, gamma, n_block) / sigma_start  # the noise part of end = sigma_e n
    n = z.numel()
    se_var, se_corr = math.sqrt(2 / n), 1 / math.sqrt(n / 4)  # one pair of a given kind per 2x2 block
    assert abs(z.var().item() - 1) < 5 * se_var, (z.var().item(), se_var)
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    tl, tr, bl = z[..., 0::2, 0::2], z[..., 0::2, 1::2], z[..., 1::2, 0::2]
    for other in (tr, bl, z[..., 1::2, 1::2]):
        assert abs(_corr(tl, other)) < 5 * se_corr
    # across block borders too (pixels 1 and 2 of a row)
    assert abs(_corr(z[..., 1:-1:2], z[..., 2::2])) < 5 / math.sqrt(n / 2)
    # controls: the block noise has correlation -gamma inside a block, plain Up has correlation 1
    bt = n_block[..., 0::2, 0::2], n_block[..., 0::2, 1::2]
    assert abs(_corr(*bt) + gamma) < 5 * se_corr and abs(n_block.var().item() - 1) < 5 * se_var
    plain = up(n_low)
    assert _corr(plain[..., 0::2, 0::2], plain[..., 0::2, 1::2]) > 0.99
    # the coarse-stage noise of the training pyramid (2 x block average) stays unit-variance white noise
    white = down_noise(torch.randn(4, 1, 1, 256, 200, generator=g, dtype=torch.float64), 1)
    assert abs(white.var().item() - 1) < 5 * math.sqrt(2 / white.numel())
    assert abs(_corr(white[..., 0::2], white[..., 1::2])) < 5 / math.sqrt(white.numel() / 2)


def test_velocity_target_is_the_derivative_of_the_path():
    sched = StageSchedule()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 2, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    for k in range(3):
        s0, s1 = sched.window(k)
        start, end = stage_endpoints(x0, noise, k, sched)
        target = velocity(start, end, s0, s1)
        level = sched.level(k)
        coarse = up(down(x0, level + 1)) if k > 0 else torch.zeros_like(end)
        for sigma_val in (s1 + 0.1 * (s0 - s1), 0.5 * (s0 + s1), s0 - 1e-3):
            sigma = torch.tensor(sigma_val, dtype=torch.float64)
            grad = torch.autograd.functional.jacobian(lambda s: interpolate(start, end, s, s0, s1), sigma)
            assert torch.allclose(grad, target, atol=1e-10)
            h = 1e-6
            fd = (interpolate(start, end, sigma + h, s0, s1) - interpolate(start, end, sigma - h, s0, s1)) / (2 * h)
            assert torch.allclose(fd, target, atol=1e-6)
            # the noise coefficient of x(sigma) is sigma itself: t = 1000 sigma means one noise level at all stages
            lam = (sigma_val - s1) / (s0 - s1)
            signal = lam * (1 - s0) * coarse + (1 - lam) * (1 - s1) * down(x0, level)
            path = interpolate(start, end, sigma, s0, s1)
            assert torch.allclose(path, signal + sigma_val * down_noise(noise, level), atol=1e-12)
        assert torch.allclose(interpolate(start, end, torch.tensor(s0, dtype=torch.float64), s0, s1), start)
        assert torch.allclose(interpolate(start, end, torch.tensor(s1, dtype=torch.float64), s0, s1), end)
    # one stage is fastpost's plain flow matching: x = (1 - s) x0 + s eps, v = eps - x0
    one = StageSchedule((0.0, 1.0))
    start, end = stage_endpoints(x0, noise, 0, one)
    assert torch.equal(start, noise) and torch.equal(end, x0)
    assert torch.allclose(velocity(start, end, 1.0, 0.0), noise - x0)
    s = torch.tensor([0.3, 0.8], dtype=torch.float64)
    assert torch.allclose(interpolate(start, end, s, 1.0, 0.0), (1 - s.view(-1, 1, 1, 1, 1)) * x0
                          + s.view(-1, 1, 1, 1, 1) * noise)


class PointMassOracle:
    """The exact velocity when the data is one clip x0: recover the stage noise from x and sigma, then v."""

    def __init__(self, x0: torch.Tensor, sched: StageSchedule):
        self.x0, self.sched, self.calls, self.start_noise = x0.double(), sched, [], []

    def __call__(self, current: Segment, history: list, lam: float, stage: int, guidance: float):
        s0, s1 = self.sched.window(stage)
        sigma = self.sched.sigma_of(stage, lam)
        level = self.sched.level(stage)
        f0, nf = current.frame_start, current.latents.shape[2]
        x0u = self.x0[:, :, f0:f0 + nf]
        d = down(x0u, level)
        u = up(down(x0u, level + 1)) if stage > 0 else torch.zeros_like(d)
        n = (current.latents.double() - lam * (1 - s0) * u - (1 - lam) * (1 - s1) * d) / sigma
        if stage > 0 and lam == 1.0:  # right after a renoise jump
            self.start_noise.append(n)
        self.calls.append((f0, stage, [(h.frame_start, h.level) for h in history]))
        return (((1 - s0) * u + s0 * n) - ((1 - s1) * d + s1 * n)).float() / (s0 - s1)


@pytest.mark.parametrize("gamma,steps,temporal", [(1 / 3, (1, 1, 1), True), (1 / 3, (3, 2, 4), True),
                                                  (0.25, (2, 2, 2), True), (1 / 3, (2, 3, 1), False)])
def test_sampler_lands_exactly_on_a_point_mass(gamma, steps, temporal):
    """With the exact velocity every Euler step is exact (the path inside a stage is straight): the sampler must
    return x0 itself. Right after each renoise jump the noise the oracle recovers must be white with unit variance
    (the sampler's Up + correction put x exactly on the next stage's path, with fresh-looking noise)."""
    cfg = PyramidSampleConfig(gamma=gamma, steps_per_stage=steps, temporal_pyramid=temporal, frame_per_unit=2)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 4, 6, 16, 24, generator=g)
    oracle = PointMassOracle(x0, cfg.schedule())
    out = sample(oracle, tuple(x0.shape), cfg, torch.Generator().manual_seed(3))
    assert out.shape == x0.shape and (out - x0).abs().max().item() < 1e-4
    assert len(oracle.calls) == sum(steps) * (4 if temporal else 1)  # units: frame 0, [1,3), [3,5), [5,6)
    n = torch.cat([z.flatten() for z in oracle.start_noise])
    pairs = torch.cat([torch.stack([z[..., 0::2, 0::2].flatten(), z[..., 0::2, 1::2].flatten()])
                       for z in oracle.start_noise], dim=1)
    assert abs(n.var().item() - 1) < 5 * math.sqrt(2 / n.numel()), n.var().item()
    assert abs(_corr(pairs[0], pairs[1])) < 5 / math.sqrt(pairs.shape[1]), _corr(pairs[0], pairs[1])
    if temporal:  # the temporal pyramid of the last unit at the finest stage: newest history finest
        last = [c for c in oracle.calls if c[0] == 5 and c[1] == 2][0]
        assert last[2] == [(0, 2), (1, 1), (3, 0)]
        # image-to-video: the first frame is kept as given, the rest still lands on x0
        out = sample(PointMassOracle(x0, cfg.schedule()), tuple(x0.shape), cfg, torch.Generator().manual_seed(3),
                     first_frame_BC1HW=x0[:, :, :1])
        assert torch.equal(out[:, :, :1], x0[:, :, :1]) and (out - x0).abs().max().item() < 1e-4


def test_units_and_temporal_pyramid():
    assert frame_units(1, 1) == [(0, 1)]
    assert frame_units(6, 2) == [(0, 1), (1, 3), (3, 5), (5, 6)]
    assert history_stages(2, 0) == []
    assert history_stages(2, 4) == [(4, 0), (3, 0), (2, 1), (1, 2)]  # (units back, stage), oldest first
    assert history_stages(0, 3) == [(3, 0), (2, 0), (1, 0)]
    assert history_stages(2, 4, max_history_units=2) == [(2, 1), (1, 2)]


def test_packing_positions_and_padding():
    g = torch.Generator().manual_seed(4)
    coarse = torch.randn(1, 4, 1, 4, 6, generator=g)
    fine = torch.randn(1, 4, 2, 8, 12, generator=g)
    packed = pack([Segment(coarse, 0, 1), Segment(fine, 1, 0)], p=2)
    assert packed.tokens.shape == (1, 1 * 2 * 3 + 2 * 4 * 6, 16)
    assert torch.equal(unpack_segment(packed.tokens, packed, 0, 2)[0], coarse)
    assert torch.equal(unpack_segment(packed.tokens, packed, -1, 2)[0], fine)
    # a coarse token covers 2x2 full-resolution patches and sits at their centre
    pos = segment_positions(1, 0, 2, 3, 1)
    assert pos[:, 1].unique().tolist() == [0.5, 2.5] and pos[:, 2].unique().tolist() == [0.5, 2.5, 4.5]
    assert segment_positions(1, 4, 2, 2, 0)[:, 0].unique().tolist() == [4.0]
    short = pack([Segment(fine[:, :, :1], 0, 0)], p=2)
    batch = pad_batch([packed, short])
    assert batch.tokens.shape[1] == packed.tokens.shape[1] and batch.token_mask[1].sum().item() == 24
    assert torch.equal(unpack_segment(batch.tokens, batch, -1, 2)[1], fine[:, :, :1])
    assert pad_batch([short, short]).token_mask is None
