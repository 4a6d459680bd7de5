"""Noise schedules: how a family's training objective corrupts data, what the model predicts, and the ODE grid.

One object per prediction type, built by the family from its scheduler config (`family.noise_schedule(config)`),
so recipes and samplers never branch on the prediction type themselves. Times `t` are the schedule's own:

  flow matching  t = sigma in [0, 1]:       x_t = (1 - sigma) x0 + sigma eps,   model sees 1000 sigma,
                                            predicts (and is trained towards) eps - x0
  v-prediction   t = DDPM index in [0, T):   x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,   model sees t,
                 (VP)                       predicts v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0

Both are x_t = a x0 + b eps; `coefficients(t)` gives (a, b). The ODE grid (`OdeGrid`, `make_grid`) discretises
the same schedule from noise (point 0) to data (point N) for few-step samplers and distillation.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch


@dataclass
class TimeSampling:
    """How flow-matching training times are drawn (recipes/finetune.py's FinetuneConfig has the same fields;
    either can be passed to `sample_times`)."""

    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"  # logit_normal = sigmoid(N(mean, std))
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_shift: float = 1.0  # > 1 moves mass towards noise (SD3 / Mochi resolution shift)


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 / Mochi-style resolution shift of flow-matching times: s' = shift s / (1 + (shift - 1) s)."""
    return shift * s / (1 + (shift - 1) * s)


def _bcast(x_B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample [B] tensor shaped to broadcast over `like`, on its device."""
    return x_B.view(-1, *([1] * (like.dim() - 1))).to(like.device)


class NoiseSchedule(abc.ABC):
    prediction_type: str

    @abc.abstractmethod
    def sample_times(self, n: int, generator: torch.Generator, cfg: Any = None) -> torch.Tensor:
        """n training times on the CPU, drawn from `generator` (identical on every rank that shares its seed)."""

    @abc.abstractmethod
    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) [B] with x_t = a x0 + b eps, on t's device."""

    @abc.abstractmethod
    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """What family.predict() takes as its timestep for schedule times t."""

    @abc.abstractmethod
    def ode_grid(self, n: int, schedule: str = "uniform", lq_threshold: float = 0.025,
                 lq_linear_steps: int | None = None) -> "OdeGrid":
        """N+1 points from noise to data (see OdeGrid)."""

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = self.coefficients(t)
        return _bcast(a, x0) * x0 + _bcast(b, x0) * eps

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What predict() should return at x_t = add_noise(x0, eps, t)."""
        if self.prediction_type == "flow_matching":
            return eps - x0
        a, b = self.coefficients(t)
        return _bcast(a, x0) * eps - _bcast(b, x0) * x0

    def estimates(self, x_t: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from a model prediction at x_t."""
        a, b = self.coefficients(t)
        return _estimates(self.prediction_type, x_t, pred, _bcast(a, x_t), _bcast(b, x_t))


def _estimates(prediction_type: str, x, pred, a, b):
    if prediction_type == "flow_matching":  # pred = eps - x0, x = (1 - s) x0 + s eps, a = 1 - s, b = s
        return x - b * pred, x + a * pred
    return a * x - b * pred, b * x + a * pred  # VP v-prediction: v = a eps - b x0, a^2 + b^2 = 1


class FlowMatchingSchedule(NoiseSchedule):
    """Rectified flow, t = sigma. Also what fastpost's Mochi and pyramid predict() expose (see models/mochi.py)."""

    prediction_type = "flow_matching"

    def sample_times(self, n: int, generator: torch.Generator, cfg: Any = None) -> torch.Tensor:
        cfg = cfg if cfg is not None else TimeSampling()
        if cfg.timestep_sampling == "logit_normal":
            s = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
        elif cfg.timestep_sampling == "uniform":
            s = torch.rand(n, generator=generator)
        else:
            raise ValueError(f"timestep_sampling must be 'logit_normal' or 'uniform', got {cfg.timestep_sampling!r}")
        return shift_sigmas(s, cfg.flow_shift)

    def coefficients(self, t):
        return 1 - t, t

    def model_timestep(self, t):
        return t * 1000

    def ode_grid(self, n, schedule="uniform", lq_threshold=0.025, lq_linear_steps=None):
        if schedule == "linear_quadratic":
            sigmas = torch.tensor(linear_quadratic_sigmas(n, lq_threshold, lq_linear_steps) + [0.0])
        elif schedule == "uniform":
            sigmas = torch.linspace(1.0, 0.0, n + 1)
        else:
            raise ValueError(f"flow-matching grid schedule must be 'uniform' or 'linear_quadratic', got {schedule!r}")
        sigmas = sigmas.double()
        return OdeGrid(1 - sigmas, sigmas, sigmas * 1000, self.prediction_type)


class VPSchedule(NoiseSchedule):
    """DDPM variance-preserving with v-prediction (CogVideoX); alphas_cumprod from the family's diffusers scheduler."""

    prediction_type = "v_prediction"

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.float()

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def sample_times(self, n: int, generator: torch.Generator, cfg: Any = None) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def coefficients(self, t):
        if self.alphas_cumprod.device != t.device:  # moved once: indexing a CPU table with device t would sync
            self.alphas_cumprod = self.alphas_cumprod.to(t.device)
        abar = self.alphas_cumprod[t]
        return abar.sqrt(), (1 - abar).sqrt()

    def model_timestep(self, t):
        return t

    def ode_grid(self, n, schedule="uniform", lq_threshold=0.025, lq_linear_steps=None):
        # `schedule` is a flow-matching choice; VP always uses evenly spaced DDPM indices (trailing, T-1 first)
        alphas = self.alphas_cumprod.double()
        t = torch.from_numpy(np.linspace(len(alphas) - 1, 0, n).round().astype(np.int64))
        abar = torch.cat([alphas[t], torch.ones(1, dtype=torch.float64)])  # the clean end: alphabar = 1
        return OdeGrid(abar.sqrt(), (1 - abar).sqrt(), torch.cat([t, torch.zeros(1, dtype=torch.int64)]),
                       self.prediction_type)


# ---- the ODE grid ------------------------------------------------------------------------------------------------
@dataclass
class OdeGrid:
    """N+1 points from noise (0) to data (N): signal/noise coefficients and the model's timestep input."""

    a: torch.Tensor  # [N+1]
    b: torch.Tensor  # [N+1]
    model_t: torch.Tensor  # [N+1] timestep fed to the model (its value at point N never matters)
    prediction_type: str

    @property
    def steps(self) -> int:
        return len(self.a) - 1

    def coeffs(self, idx: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a, b at grid points idx (a CPU index tensor), shaped to broadcast over `like` and on its device."""
        shape = (-1, *([1] * (like.dim() - 1)))
        return self.a[idx].view(shape).to(like.device), self.b[idx].view(shape).to(like.device)

    def estimates(self, x: torch.Tensor, pred: torch.Tensor, idx: torch.Tensor):
        """(x0_hat, eps_hat) from a model prediction at points idx."""
        a, b = self.coeffs(idx, x)
        return _estimates(self.prediction_type, x, pred, a, b)

    def ddim(self, x: torch.Tensor, pred: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        x0, eps = self.estimates(x, pred, src)
        a, b = self.coeffs(dst, x)
        return a * x0 + b * eps

    def renoise(self, x: torch.Tensor, pred: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """A few-step generator's step: its clean estimate at src, noised to dst with fresh `noise` (DMD2's
        sampler); without noise the DDIM step (the estimated eps re-used)."""
        if noise is None:
            return self.ddim(x, pred, src, dst)
        x0, _ = self.estimates(x, pred, src)
        a, b = self.coeffs(dst, x)
        return a * x0 + b * noise.to(x.device, x.dtype)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """What the model should predict at x = a x0 + b eps on points idx (its denoising objective)."""
        if self.prediction_type == "flow_matching":
            return eps - x0
        a, b = self.coeffs(idx, x0)
        return a * eps - b * x0


def linear_quadratic_sigmas(n: int, threshold: float, linear_steps: int | None = None) -> list[float]:
    """Mochi's sigmas (1 -> ~0, n values): linear from 1 down to 1 - threshold over the first `linear_steps`
    (default n // 2, as MochiPipeline), then a quadratic that joins the line with matching slope and would reach
    sigma 0 one step past the end."""
    linear_steps = n // 2 if linear_steps is None else linear_steps
    if not 0 < linear_steps < n:
        raise ValueError(f"the linear-quadratic sigma schedule needs 0 < linear_steps < steps (steps >= 2), got "
                         f"steps={n}, linear_steps={linear_steps}")
    quad_steps = n - linear_steps
    # q(i) = qc i^2 + lc i + const on [linear_steps, n): continuous with the line at linear_steps, 1 at i = n
    diff = linear_steps - threshold * n
    qc = diff / (linear_steps * quad_steps**2)
    lc = threshold / linear_steps - 2 * diff / quad_steps**2
    const = qc * linear_steps**2
    lin = [i * threshold / linear_steps for i in range(linear_steps)]
    quad = [qc * i**2 + lc * i + const for i in range(linear_steps, n)]
    return [1.0 - s for s in lin + quad]


def make_grid(family_or_schedule, flavor: str | None, n: int, schedule: str = "uniform", lq_threshold: float = 0.025,
              lq_linear_steps: int | None = None, scheduler_config: dict | None = None) -> OdeGrid:
    """The teacher's ODE grid of n steps, from a NoiseSchedule, or from a family and its scheduler config
    (`scheduler_config` when given, else the flavor's)."""
    ns = family_or_schedule
    if not isinstance(ns, NoiseSchedule):
        config = scheduler_config if scheduler_config is not None else ns.scheduler_config(flavor=flavor)
        ns = ns.noise_schedule(config)
    return ns.ode_grid(n, schedule, lq_threshold, lq_linear_steps)


def phase_edges(n: int, phases: int) -> torch.Tensor:
    if not 1 <= phases <= n:
        raise ValueError(f"phases must be in [1, num_teacher_steps={n}], got {phases}")
    return torch.tensor([round(m * n / phases) for m in range(phases + 1)])


def even_edges(n: int, steps: int) -> torch.Tensor:
    """`steps` DDIM jumps spread evenly over an n-point grid (the teacher's k-step sampler)."""
    return phase_edges(n, steps)


def randn_on(shape, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn ON `device`: no host tensor and no copy in the training step. On CPU it is
    drawn from `generator` itself; on an accelerator from a device generator seeded by one draw of `generator`
    (so SP peers and resumed runs, which share the CPU generator's seed, draw identical noise there too)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.randn(shape, generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # a CPU tensor: no device sync
    return torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device)
