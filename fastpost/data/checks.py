"""Start-up checks: do the latent shards (and the job's flavor) fit the model that will train on them?

A mismatch found here would otherwise train silently on the wrong data (captions cut to 16 tokens while the
sampler pads to 226, a scheduler of another checkpoint) or crash deep inside the first forward. Each check
raises one line naming both values and the fix. Like the rest of data/, this module is handed a family object and
a transformer config and never looks a family up.

What is checked, per source of the shards:
  written by `fastpost preprocess` (header has vae.family):  family, VAE class, latent normalisation (when the
      pretrained pipeline has vae/config.json), text mask convention, and everything below
  any shards (also fastpost.data.synthetic.write_latent_shards, header vae_family "synthetic"): latent channels,
      text width and text length read from the manifest's tensor shapes, latent frames / height / width divisible
      by the transformer's patch sizes
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from fastpost.components import latent_norm
from fastpost.config import ConfigError
from fastpost.data.shards import ShardDataset, ShardError

# transformer config keys that hold the width of the prompt embeddings it takes (diffusers and fastpost classes)
TEXT_WIDTH_KEYS = ("text_embed_dim", "text_dim", "joint_attention_dim", "caption_channels")


class DataModelMismatch(ShardError):
    """The shards were made for another model (or with other settings) than the one being trained."""


class ComponentMismatch(ConfigError):
    """A pipeline component (text encoder, VAE) does not belong to the transformer it is used with."""


class ObjectiveMismatch(ConfigError):
    """model.flavor names a noise schedule that contradicts the pretrained checkpoint's scheduler/."""


def _get(config: Any, key: str, default=None):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def text_width(config: Any) -> int | None:
    for key in TEXT_WIDTH_KEYS:
        value = _get(config, key)
        if value is not None:
            return int(value)
    return None


def _sample_shapes(dataset: ShardDataset) -> tuple[set, set, set]:
    """(latent shapes, prompt_embeds shapes, mask shapes) over every sample, from the manifest (no tensor reads)."""
    latents, embeds, masks = set(), set(), set()
    for record in dataset._records:
        latents.add(tuple(record["latents_shape"]))
        embeds.add(tuple(record["prompt_embeds_shape"]))
        masks.add(tuple(record["prompt_attention_mask_shape"]))
    return latents, embeds, masks


def pretrained_vae_config(pretrained: str | None) -> dict | None:
    """<pretrained>/vae/config.json when the checkpoint is a whole pipeline folder, else None."""
    if pretrained is None:
        return None
    path = Path(pretrained) / "vae" / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_shards_for_model(dataset: ShardDataset, family: Any, model_config: Any,
                           vae_config: Mapping | None = None) -> None:
    """Raise DataModelMismatch if the shards in `dataset` cannot train `family`'s model with `model_config`
    (its transformer config); vae_config: the pipeline's VAE config, to compare the latent normalisation."""
    root, header = dataset.root, dataset.header
    fix = f"re-run `fastpost preprocess` for this model into a new output_dir (shards: {root})"
    vae = header.get("vae") if isinstance(header.get("vae"), dict) else None
    text = header.get("text_encoder") if isinstance(header.get("text_encoder"), dict) else None
    if vae is not None:  # written by preprocessing: the encoding conventions are recorded
        if vae.get("family") != family.name:
            raise DataModelMismatch(f"the shards were made for model family {vae.get('family')!r} but model.family is "
                                    f"{family.name!r}; {fix}")
        if family.vae is not None and vae.get("class") != family.vae.class_name:
            raise DataModelMismatch(f"the shards were encoded with a {vae.get('class')} VAE but {family.name} uses "
                                    f"{family.vae.class_name}; {fix}")
        if vae_config is not None and vae.get("normalization") != latent_norm(dict(vae_config)):
            raise DataModelMismatch(f"the shards' latent normalisation {vae.get('normalization')} differs from the "
                                    f"pretrained pipeline's VAE {latent_norm(dict(vae_config))}; {fix} with its vae/")
    if text is not None and family.text is not None and text.get("pass_mask") != family.text.pass_mask:
        raise DataModelMismatch(
            f"the shards' prompts were encoded with pass_mask={text.get('pass_mask')} but the {family.name} pipeline "
            f"(and `fastpost sample`) encodes with pass_mask={family.text.pass_mask}; {fix} without "
            f"text_encoder_pass_mask")
    if model_config is None:
        return
    need = family.cond_fields(model_config) if hasattr(family, "cond_fields") else ()
    have = tuple(getattr(dataset, "cond_fields", ()))
    lacking = [f for f in need if f not in have]
    if lacking:
        raise DataModelMismatch(
            f"the transformer is image-to-video ({family.name}, in_channels={_get(model_config, 'in_channels')}) and "
            f"needs the first frame's {lacking}, but the shards in {root} carry {list(have) or 'none'}; {fix} with "
            f"the I2V pipeline (transformer=<its folder>), which stores them")
    latents, embeds, _ = _sample_shapes(dataset)
    # the video latents' channels: an I2V transformer's in_channels also count the image channels it concatenates
    channels = _get(model_config, "out_channels") or _get(model_config, "in_channels")
    if channels is not None and getattr(family, "latent_patch", None):  # 2x2 patches packed as features (Flux)
        channels //= family.latent_patch[1] * family.latent_patch[2]
    for shape in sorted(latents):
        if channels is not None and shape[0] != channels:
            raise DataModelMismatch(f"the shards hold latents with {shape[0]} channels (shape {list(shape)}) but the "
                                    f"transformer takes {channels}-channel latents: they were made with another "
                                    f"VAE; {fix}")
        if len(shape) == 4 and hasattr(family, "patch_sizes") and _get(model_config, "patch_size") is not None:
            pt, ph, pw = family.patch_sizes(model_config)
            if shape[1] % pt:
                raise DataModelMismatch(
                    f"the shards hold {shape[1]} latent frames (shape {list(shape)}) but the transformer's "
                    f"patch_size_t={pt} needs a multiple of {pt}; preprocess with the transformer's config "
                    f"(transformer=<pipeline or transformer dir>), which pads by repeating the first latent frame")
            if shape[2] % ph or shape[3] % pw:
                raise DataModelMismatch(f"the shards' latent height x width {shape[2]}x{shape[3]} is not a multiple of "
                                        f"the patch size {ph}x{pw}; {fix} with resolutions that are multiples of "
                                        f"{ph} x the VAE's spatial factor")
    width = text_width(model_config)
    length = family.text.max_length(model_config) if family.text is not None else None
    for shape in sorted(embeds):
        if width is not None and shape[-1] != width:
            raise DataModelMismatch(f"the shards hold prompt embeddings of width {shape[-1]} but the transformer takes "
                                    f"{width}: they were made with another text encoder; {fix} with the model's "
                                    f"text encoder")
        if length is not None and shape[0] != length:
            raise DataModelMismatch(
                f"the shards hold prompts of {shape[0]} tokens but the transformer's {family.text.max_length_key} is "
                f"{length} (what its pipeline and `fastpost sample` pad to); {fix} with max_text_length={length} "
                f"(or leave it unset and pass the pipeline: it is read from the transformer config)")


def check_text_encoder_for_model(text_encoder_dir: str | Path, model_config: Any) -> None:
    """The text encoder's output width (config d_model / hidden_size) must be the transformer's text width."""
    path = Path(text_encoder_dir)
    path = path / "text_encoder" if (path / "text_encoder" / "config.json").is_file() else path
    if not (path / "config.json").is_file():
        return  # the loader names the missing folder itself
    config = json.loads((path / "config.json").read_text())
    got, want = config.get("d_model", config.get("hidden_size")), text_width(model_config)
    if got is not None and want is not None and int(got) != want:
        raise ComponentMismatch(f"the text encoder in {str(path)!r} outputs width {got} but the transformer takes "
                                f"{want}: set model.text_encoder to the model's own text encoder")


def objective_scheduler_config(family: Any, pretrained: str | None, flavor: str | None) -> dict:
    """The scheduler config whose noise schedule training must use. With a pretrained checkpoint the truth is its
    own scheduler/ (a flavor only names a config for random init and docs); a flavor whose noise schedule differs
    from it (so training would optimise another objective than the model was trained with) raises instead of
    silently winning. Without scheduler/ in the checkpoint (a bare transformer dir), or without a checkpoint: the
    flavor's (the family's default flavor when flavor is None)."""
    has_own = pretrained is not None and (Path(pretrained) / "scheduler" / "scheduler_config.json").is_file()
    if not has_own:
        return family.scheduler_config(None, flavor)
    ckpt = family.scheduler_config(pretrained, None)
    if flavor is not None:
        named = family.scheduler_config(None, flavor)
        a, b = family.noise_schedule(named).ode_grid(50), family.noise_schedule(ckpt).ode_grid(50)
        same = a.a.shape == b.a.shape and bool((a.a - b.a).abs().max() <= 1e-6) and bool(
            (a.b - b.b).abs().max() <= 1e-6)
        if not same:
            diffs = ", ".join(f"{k} {named.get(k)!r} vs {ckpt.get(k)!r}" for k in sorted(set(named) | set(ckpt))
                              if named.get(k) != ckpt.get(k) and k in _OBJECTIVE_KEYS)
            raise ObjectiveMismatch(
                f"model.flavor={flavor!r} has another noise schedule than {pretrained}/scheduler "
                f"({diffs or 'alphas differ'}): the checkpoint's own scheduler is the objective it was trained with; "
                f"set model.flavor=null")
    return ckpt


# scheduler keys that change the training objective (the rest only change how a sampler walks the schedule)
_OBJECTIVE_KEYS = {"beta_start", "beta_end", "beta_schedule", "trained_betas", "num_train_timesteps",
                   "prediction_type", "rescale_betas_zero_snr", "snr_shift_scale", "shift", "use_dynamic_shifting"}


__all__ = ["ComponentMismatch", "DataModelMismatch", "ObjectiveMismatch", "TEXT_WIDTH_KEYS",
           "check_shards_for_model", "check_text_encoder_for_model", "objective_scheduler_config",
           "pretrained_vae_config", "text_width"]
