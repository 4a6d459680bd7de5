"""Pyramidal flow matching: stage windows, resampling, endpoints, the renoise correction, the temporal pyramid.

Time convention (fastpost's, used everywhere in this package): sigma is the noise level,
    x_sigma = (1 - sigma) * signal + sigma * noise,   sigma = 1 is pure noise, sigma = 0 is data,
the model is called with t = 1000 * sigma and predicts the velocity d x_sigma / d sigma. The paper writes the
same path with the data coefficient tau = 1 - sigma (x_tau = tau * x1 + (1 - tau) * n, x1 = data).

Spatial stages. With K stages (stage_range has K + 1 boundaries b_0 = 0 < ... < b_K = 1 in tau), stage k
(generation order, k = 0 coarsest) runs at 1/2^(K-1-k) of the full latent resolution over the window
sigma in [sigma_end_k, sigma_start_k]:
    end_k   = (1 - sigma_end_k)   * Down(x0, K-1-k)        + sigma_end_k   * n_k,   sigma_end_k = 1 - b_{k+1}
    start_k = (1 - sigma_start_k) * Up(Down(x0, K-k))      + sigma_start_k * n_k    (start_0 = n_0, pure noise)
    x(sigma) = end_k + lam * (start_k - end_k),  lam = (sigma - sigma_end_k) / (sigma_start_k - sigma_end_k)
    v_k      = d x / d sigma = (start_k - end_k) / (sigma_start_k - sigma_end_k)
The noise coefficient of x(sigma) is exactly sigma (linear in lam), so t = 1000 sigma means the same noise level at
every stage. Down(., j) averages 2x2 pixels j times (data); noise is downsampled as 2 * average (sum / 2), so n_k
stays white with unit variance and the noises of all stages are one coupled pyramid of the full-resolution noise.

Renoise at a stage jump (the paper's correction). Up (nearest) of end_k has block-constant noise; adding
block-correlated noise n' (2x2 blocks, unit variance, correlation -gamma) restores white noise:
    start_{k+1} = alpha * Up(end_k) + beta * n',
    alpha = 1 / (sqrt(1 + 1/gamma) * sigma_e + 1 - sigma_e),  beta = alpha * sigma_e / sqrt(gamma),
    sigma_start_{k+1} = 1 - alpha * (1 - sigma_e)                                     (sigma_e = sigma_end_k)
The noise part alpha*sigma_e*Up(n_k) + beta*n' has per-element variance (alpha sigma_e)^2 (1 + 1/gamma) =
sigma_start^2 and within-block covariance (alpha sigma_e)^2 (1 - gamma/gamma) = 0: white, unit variance after
dividing by sigma_start. With gamma = 1/3 (the paper): alpha = (1 + s)/2, beta = sqrt(3)(1 - s)/2 with
s = 1 - sigma_start, i.e. sigma_start = 2 sigma_e / (1 + sigma_e); and n' = (2/sqrt(3)) * (n_{k+1} - Up(n_k)/2)
makes the identity start_{k+1} = alpha Up(end_k) + beta n' exact sample by sample (tests/test_pyramid_math.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

PAPER_STAGE_RANGE = (0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0)


# ---- resampling ---------------------------------------------------------------------------------------------------
def down(x_BCFHW: torch.Tensor, times: int = 1) -> torch.Tensor:
    """Average 2x2 spatial blocks `times` times (the data path; equals bilinear x0.5 without antialiasing)."""
    for _ in range(times):
        b, c, f, h, w = x_BCFHW.shape
        if h % 2 or w % 2:
            raise ValueError(f"cannot halve a {h}x{w} latent: height and width must be even at every stage")
        x_BCFHW = x_BCFHW.reshape(b, c, f, h // 2, 2, w // 2, 2).mean(dim=(4, 6))
    return x_BCFHW


def down_noise(n_BCFHW: torch.Tensor, times: int = 1) -> torch.Tensor:
    """Noise at a coarser stage: 2 * average of 2x2 blocks keeps white noise white with unit variance."""
    return down(n_BCFHW, times) * 2.0 ** times


def up(x_BCFHW: torch.Tensor, times: int = 1) -> torch.Tensor:
    """Nearest-neighbour 2x spatial upsampling, `times` times."""
    r = 2 ** times
    return x_BCFHW.repeat_interleave(r, dim=-2).repeat_interleave(r, dim=-1) if times else x_BCFHW


def block_noise(shape: tuple[int, ...], gamma: float, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian noise with unit variance and correlation -gamma inside every 2x2 spatial block (0 < gamma <= 1/3).

    The block covariance (1 + gamma) I - gamma 11^T has eigenvalue 1 + gamma on zero-mean block patterns and
    1 - 3 gamma on the constant one, so n' = sqrt(1+gamma) (z - mean_block z) + sqrt(1-3gamma) mean_block z."""
    if not 0.0 < gamma <= 1.0 / 3.0 + 1e-12:
        raise ValueError(f"gamma must be in (0, 1/3] (the block covariance must be positive semi-definite), "
                         f"got {gamma}")
    z = torch.randn(shape, generator=generator, dtype=dtype)
    mean = up(down(z))
    return math.sqrt(1.0 + gamma) * (z - mean) + math.sqrt(max(0.0, 1.0 - 3.0 * gamma)) * mean


def renoise_coefficients(sigma_end: float, gamma: float) -> tuple[float, float, float]:
    """(alpha, beta, sigma_start of the next stage) for a jump out of a stage that ended at sigma_end."""
    c = math.sqrt(1.0 + 1.0 / gamma)
    alpha = 1.0 / (c * sigma_end + 1.0 - sigma_end)
    beta = alpha * sigma_end / math.sqrt(gamma)
    return alpha, beta, 1.0 - alpha * (1.0 - sigma_end)


def renoise(x_end_BCFHW: torch.Tensor, sigma_end: float, gamma: float, noise_block: torch.Tensor) -> torch.Tensor:
    """Upsample the end of a stage and add block-correlated noise: the start of the next stage, white noise again."""
    alpha, beta, _ = renoise_coefficients(sigma_end, gamma)
    return alpha * up(x_end_BCFHW) + beta * noise_block


# ---- stage windows ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageSchedule:
    """The K stage windows in sigma; stage k runs at 1/2^(K-1-k) resolution."""

    stage_range: tuple[float, ...] = PAPER_STAGE_RANGE  # boundaries in tau = 1 - sigma, 0 first, 1 last
    gamma: float = 1.0 / 3.0

    def __post_init__(self) -> None:
        r = tuple(float(v) for v in self.stage_range)
        object.__setattr__(self, "stage_range", r)
        if len(r) < 2 or r[0] != 0.0 or r[-1] != 1.0 or any(a >= b for a, b in zip(r, r[1:])):
            raise ValueError(f"stage_range must increase strictly from 0 to 1 (K + 1 boundaries), got {list(r)}")
        if not 0.0 < self.gamma <= 1.0 / 3.0 + 1e-12:
            raise ValueError(f"gamma must be in (0, 1/3], got {self.gamma}")

    @property
    def num_stages(self) -> int:
        return len(self.stage_range) - 1

    def level(self, stage: int) -> int:
        """Downsampling exponent of a stage: its latents are 1/2^level of the full resolution."""
        return self.num_stages - 1 - stage

    def sigma_end(self, stage: int) -> float:
        return 1.0 - self.stage_range[stage + 1]

    def sigma_start(self, stage: int) -> float:
        if stage == 0:
            return 1.0
        return renoise_coefficients(self.sigma_end(stage - 1), self.gamma)[2]

    def window(self, stage: int) -> tuple[float, float]:
        """(sigma_start, sigma_end) of a stage."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} out of range for {self.num_stages} stages")
        return self.sigma_start(stage), self.sigma_end(stage)

    def sigmas(self, stage: int, steps: int) -> torch.Tensor:
        """Euler grid of one stage: steps + 1 sigmas from its start to its end (float64)."""
        if steps < 1:
            raise ValueError(f"each stage needs at least one step, got {steps}")
        s0, s1 = self.window(stage)
        return torch.linspace(s0, s1, steps + 1, dtype=torch.float64)

    # ---- the conventions a model is trained and sampled with (fastpost's own here; a family whose released
    # weights were trained otherwise subclasses this, e.g. pyramid_flux.MinifluxSchedule). In a stage, lam runs
    # from 1 (its start) to 0 (its end): x = end + lam (start - end), sigma = sigma_end + lam (sigma_start - ...).
    channels_last: ClassVar[bool] = False  # patch features (c p1 p2); True: (p1 p2 c)
    default_stage_weights: ClassVar[tuple[float, ...] | None] = None  # None: every stage equally often
    null_text: ClassVar[str] = "zeros"  # the unconditional prompt: zero embeddings + all-false mask ("empty_prompt": encoded "")

    def lam_from_uniform(self, u_B: torch.Tensor) -> torch.Tensor:
        """Training lam from U(0, 1) draws (or logit-normal ones)."""
        return u_B.double()

    def sigma_of(self, stage: int, lam):
        s0, s1 = self.window(stage)
        return s1 + lam * (s0 - s1)

    def model_timestep(self, stage: int, lam):
        """The timestep the model is called with: 1000 sigma (the same noise level means the same t everywhere)."""
        return 1000.0 * self.sigma_of(stage, lam)

    def target_scale(self, stage: int) -> float:
        """target = target_scale * (start - end): 1 / (sigma_start - sigma_end) gives d x / d sigma."""
        s0, s1 = self.window(stage)
        return 1.0 / (s0 - s1)

    def lam_grid(self, stage: int, steps: int) -> list[float]:
        """The Euler grid of one stage in lam, 1 first and 0 last (steps + 1 points, uniform in sigma)."""
        s0, s1 = self.window(stage)
        return [(s - s1) / (s0 - s1) for s in self.sigmas(stage, steps).tolist()]

    def euler_step(self, stage: int, lam: float, lam_next: float) -> float:
        """The factor of the model output in one Euler step x <- x + factor * v (v estimates the target)."""
        return (lam_next - lam) / self.target_scale(stage)

    def positions(self, frames: int, frame_start: int, h_tokens: int, w_tokens: int, level: int,
                  current_hw: tuple[int, int]) -> torch.Tensor:
        """[F*h*w, 3] (frame, row, column) of a segment's tokens: full-resolution patch units (packing.py)."""
        from fastpost.models.pyramid.packing import segment_positions

        return segment_positions(frames, frame_start, h_tokens, w_tokens, level)


@dataclass(frozen=True)
class PyramidSpec:
    """What recipe pyramid_flow and the pyramidal sampler need from a family (ModelFamily.pyramid)."""

    schedule: type  # a StageSchedule subclass: schedule(stage_range, gamma) -> the conventions
    forward: Callable  # (model, Packed, timesteps_B, text: dict of prompt_embeds/_attention_mask[/pooled]) -> out
    patch: Callable | int  # latent patch size: an int, or (model.config) -> int
    guidance: tuple[float, float] = (7.0, 5.0)  # default CFG of the first frame, of later units
    first_frame_steps: tuple[int, ...] = (10, 10, 10)  # default Euler steps per stage of the first-frame unit
    steps: tuple[int, ...] = (10, 10, 10)  # of later units
    # planning (fastpost plan), for families whose VAE is not fastpost's: (config, height, width, frames) ->
    # (video tokens, text tokens) of the longest sequence training packs; and (probe model, config, (f, h, w)
    # token grid, text tokens) -> a callable running one forward of the probe model. None: the generic planner.
    plan_sequence: Callable | None = None
    probe: Callable | None = None

    def patch_size(self, model) -> int:
        return self.patch if isinstance(self.patch, int) else int(self.patch(model.config))


# ---- the flow inside a stage --------------------------------------------------------------------------------------
def stage_endpoints(x0_BCFHW: torch.Tensor, noise_BCFHW: torch.Tensor, stage: int, sched: StageSchedule):
    """(start, end) of `stage` at its resolution from full-resolution data and full-resolution noise."""
    level = sched.level(stage)
    s0, s1 = sched.window(stage)
    n = down_noise(noise_BCFHW, level)
    end = (1.0 - s1) * down(x0_BCFHW, level) + s1 * n
    if stage == 0:
        return n, end
    coarse = up(down(x0_BCFHW, level + 1))
    return (1.0 - s0) * coarse + s0 * n, end


def lam_of(sigma, s0: float, s1: float):
    return (sigma - s1) / (s0 - s1)


def interpolate(start: torch.Tensor, end: torch.Tensor, sigma: torch.Tensor, s0: float, s1: float) -> torch.Tensor:
    """x(sigma) on the straight path from start (sigma = s0) to end (sigma = s1); sigma: [B] or a scalar."""
    lam = lam_of(sigma, s0, s1)
    if lam.dim() == 1:
        lam = lam.view(-1, *([1] * (start.dim() - 1)))
    return end + lam * (start - end)


def velocity(start: torch.Tensor, end: torch.Tensor, s0: float, s1: float) -> torch.Tensor:
    """d x(sigma) / d sigma: the regression target in fastpost's convention."""
    return (start - end) / (s0 - s1)


# ---- frame units and the temporal pyramid -------------------------------------------------------------------------
def frame_units(num_frames: int, frame_per_unit: int) -> list[tuple[int, int]]:
    """[start, stop) latent frames of each autoregressive unit: unit 0 is the first frame alone (generated like an
    image, its own guidance scale), then units of frame_per_unit frames (the last one may be shorter)."""
    if num_frames < 1 or frame_per_unit < 1:
        raise ValueError(f"need num_frames >= 1 and frame_per_unit >= 1, got {num_frames}, {frame_per_unit}")
    units = [(0, 1)]
    for start in range(1, num_frames, frame_per_unit):
        units.append((start, min(num_frames, start + frame_per_unit)))
    return units


def history_stages(stage: int, n_history: int, max_history_units: int | None = None) -> list[tuple[int, int]]:
    """(history unit offset j, its stage) oldest first, for a current unit at `stage` with n_history units before it.

    Temporal pyramid: the unit just before (j = 1) is kept at the current stage's resolution, each older unit one
    stage coarser, down to stage 0; everything older stays at stage 0. max_history_units keeps only the newest."""
    n = n_history if max_history_units is None else min(n_history, max_history_units)
    return [(j, max(stage + 1 - j, 0)) for j in range(n, 0, -1)]
