"""LoRA export/import round trips (in process): the diffusers pipeline path and the no-pipeline path (pyramid),
with alpha != rank so a lost adapter config would show as a rescaled adapter."""

import pytest
import torch

from fastpost.lora import LoRAConfig, export_lora, inject_lora, load_lora
from fastpost.models import get_family
from tests._parity import make_model  # every weight perturbed: zero-initialised outputs hide nothing

CASES = [("cogvideox", (1, 4, 3, 10, 10), 8), ("pyramid", (1, 4, 2, 8, 8), 8)]


@pytest.mark.parametrize("family_name,latent_shape,text_len", CASES)
def test_exported_lora_reloads_to_the_same_output(family_name, latent_shape, text_len, tmp_path):
    family = get_family(family_name)
    cfg = LoRAConfig(enabled=True, rank=4, alpha=8.0)
    trained = inject_lora(make_model(family, "debug"), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stands in for training: every adapter weight non-zero
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    path = export_lora(trained, tmp_path / "lora", family.pipeline_class)
    assert path.is_file() and not list(path.parent.glob("*.part"))

    fresh = load_lora(make_model(family, "debug"), tmp_path / "lora")
    base = make_model(family, "debug")
    x = torch.randn(latent_shape, generator=g)
    emb, mask = torch.randn(1, text_len, 16, generator=g), torch.ones(1, text_len)
    t = torch.tensor([400.0]) if family.prediction_type == "flow_matching" else torch.tensor([400])
    with torch.no_grad():
        a, b, c = (family.predict(m, x, t, emb, mask) for m in (trained, fresh, base))
    assert (a - c).abs().max() > 1e-3, "the adapter changes nothing: the comparison would be vacuous"
    assert (a - b).abs().max() <= 1e-5


def test_load_lora_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pytorch_lora_weights.safetensors in"):
        load_lora(torch.nn.Linear(2, 2), tmp_path)
