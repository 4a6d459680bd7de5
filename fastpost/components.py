"""The non-transformer parts of a video pipeline, as data: VAE and text-encoder specs, and the VAE helpers.

A low-level module: data (preprocessing), sampling and the model families all import it; it imports nothing of
fastpost. A family (fastpost/models/<name>.py) fills a `VaeSpec` and a `TextSpec`; everything else reads them.

Latent normalisation follows what the diffusers pipelines apply, read from the VAE config alone:
  latents_mean / latents_std present (Mochi, Wan):  z = (x - mean) / std * scaling_factor
  otherwise (CogVideoX):                            z = (x - shift_factor) * scaling_factor   (shift None -> 0)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

def _config_dict(vae_or_config: Any) -> Mapping:
    return getattr(vae_or_config, "config", vae_or_config)


@dataclass(frozen=True)
class VaeSpec:
    """A family's VAE: its diffusers class, how its config gives the compression factors, a tiny config."""

    class_name: str  # e.g. "AutoencoderKLCogVideoX"
    factors_fn: Callable[[Mapping], tuple[int, int]]  # VAE config -> (spatial, temporal) compression
    debug_config: Mapping[str, Any] = field(default_factory=dict)  # kwargs of a tiny random VAE (tests, demo)
    channels_key: str = "latent_channels"  # the VAE config key of its latent channels (AutoencoderKLWan: z_dim)

    def check(self, vae_or_config: Any) -> Mapping:
        cfg = _config_dict(vae_or_config)
        name = cfg.get("_class_name") or type(vae_or_config).__name__
        if name != self.class_name:
            raise ValueError(f"the VAE is a {name}, but this family uses {self.class_name}: pass the family's VAE")
        return cfg

    def factors(self, vae_or_config: Any) -> tuple[int, int]:
        """(spatial, temporal) compression; valid pixel frame counts are temporal * k + 1."""
        return self.factors_fn(self.check(vae_or_config))

    def latent_channels(self, vae_or_config: Any) -> int | None:
        return _config_dict(vae_or_config).get(self.channels_key)

    def frame_multiple(self, vae_or_config: Any) -> int:
        return self.factors(vae_or_config)[1]

    def build_tiny(self, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
        """Save a tiny random VAE of this class into out_dir (save_pretrained); returns out_dir."""
        import diffusers

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            vae = getattr(diffusers, self.class_name)(**{**self.debug_config, **overrides}).eval()
        vae.save_pretrained(str(out_dir))
        return Path(out_dir)


@dataclass(frozen=True)
class TextSpec:
    """A family's text encoder and how its diffusers pipeline runs it (see _get_t5_prompt_embeds there)."""

    encoder_class: str = "T5EncoderModel"  # a transformers class
    tokenizer_class: str = "AutoTokenizer"
    max_length_key: str = "max_sequence_length"  # transformer config key: the prompt length the pipeline pads to
    pass_mask: bool = True  # the encoder sees the attention mask (CogVideoX: no, padding attends to everything)
    zero_padding: bool = False  # embeddings at padding positions are zeroed after encoding (Wan trims + pads)
    mask_used: bool = True  # the transformer attends only to valid tokens (CogVideoX attends to all)
    # the prompt length when the transformer config has no max_length_key (Wan: the pipeline's fixed 512)
    default_max_length: int | None = None
    # the pipeline's prompt cleaning before tokenising (Wan: ftfy + html unescape + whitespace), None: verbatim
    prompt_clean: Callable[[str], str] | None = None

    def max_length(self, transformer_config: Any) -> int | None:
        cfg = transformer_config
        value = cfg.get(self.max_length_key) if isinstance(cfg, Mapping) else getattr(cfg, self.max_length_key, None)
        return value if value is not None else self.default_max_length


# ---- VAE helpers (generic over diffusers AutoencoderKL* classes) ----------------------------------------------------
def load_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             spec: VaeSpec | None = None, allow_pickle: bool = False):
    """The VAE in a VAE folder or a pipeline folder (vae/), of the class its config names (checked against
    `spec` when given)."""
    import diffusers

    path = Path(path)
    if (path / "vae" / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no VAE config.json in {str(path)!r}; pass a folder written by save_pretrained")
    config = json.loads((path / "config.json").read_text())
    name = config.get("_class_name")
    if spec is not None:
        spec.check(config)
    if not (isinstance(name, str) and name.startswith("Autoencoder") and hasattr(diffusers, name)):
        raise ValueError(f"VAE in {str(path)!r} is {name!r}, not a diffusers autoencoder class")
    # torch_dtype at load time (not .to(dtype)) so diffusers keeps any fp32-pinned modules in fp32.
    from fastpost.safe_load import pretrained_kwargs  # safetensors only, unless the job opts in to pickles

    return getattr(diffusers, name).from_pretrained(str(path), torch_dtype=dtype,
                                                    **pretrained_kwargs(path, allow_pickle)).to(device).eval()


def latent_norm(vae_or_config: Any) -> dict[str, Any]:
    """The normalisation constants, as recorded in the manifest header (accepts a VAE, its config or this dict)."""
    if isinstance(vae_or_config, dict) and "formula" in vae_or_config:
        return vae_or_config
    cfg = _config_dict(vae_or_config)
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    sf = float(cfg.get("scaling_factor") or 1.0)
    if mean is not None and std is not None:
        # MochiPipeline decodes with z * std / sf + mean, so the DiT-side value is (x - mean) / std * sf.
        return {"formula": "(mean - latents_mean) / latents_std * scaling_factor", "scaling_factor": sf,
                "latents_mean": [float(v) for v in mean], "latents_std": [float(v) for v in std]}
    # CogVideoXPipeline decodes with z / sf (shift_factor is None for CogVideoX).
    shift = cfg.get("shift_factor")
    return {"formula": "(mean - shift_factor) * scaling_factor", "scaling_factor": sf,
            "shift_factor": float(shift or 0.0)}


def _channel_view(values: list[float], like: torch.Tensor, channel_dim: int) -> torch.Tensor:
    shape = [1] * like.ndim
    shape[channel_dim] = len(values)
    return torch.tensor(values, dtype=torch.float32).view(shape).to(like.device)


def normalize_latents(vae: Any, x: torch.Tensor, channel_dim: int = -4) -> torch.Tensor:
    """Posterior-mean latents -> DiT-input latents ([..., C, F, H, W]); computed in fp32, returned in x.dtype."""
    n = latent_norm(vae)
    x32 = x.float()
    if "latents_mean" in n:
        mean = _channel_view(n["latents_mean"], x32, channel_dim)
        std = _channel_view(n["latents_std"], x32, channel_dim)
        return ((x32 - mean) / std * n["scaling_factor"]).to(x.dtype)
    return ((x32 - n["shift_factor"]) * n["scaling_factor"]).to(x.dtype)


def denormalize_latents(vae: Any, z: torch.Tensor, channel_dim: int = -4) -> torch.Tensor:
    """Inverse of normalize_latents: DiT-output latents -> what vae.decode expects."""
    n = latent_norm(vae)
    z32 = z.float()
    if "latents_mean" in n:
        mean = _channel_view(n["latents_mean"], z32, channel_dim)
        std = _channel_view(n["latents_std"], z32, channel_dim)
        return (z32 * std / n["scaling_factor"] + mean).to(z.dtype)
    return (z32 / n["scaling_factor"] + n["shift_factor"]).to(z.dtype)
