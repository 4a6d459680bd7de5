"""The pyramid MMDiT in one process: block-causal and text masks, padding, mixed resolutions, save/load, the
family API, and both recipes (pyramid_flow and the generic finetune) on it."""

import pytest
import torch

from fastpost.models import get_family
from tests._parity import make_model
from fastpost.models.pyramid import forward_packed
from fastpost.models.pyramid.packing import Segment, pack, pad_batch, unpack_segment
from fastpost.recipes import RecipeContext, get_recipe

FAMILY = get_family("pyramid")


def inputs(seed=0, frames=3, h=6, w=10, batch=2, text=8):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text, dtype=torch.bool)
    mask[-1, 5:] = False
    return (torch.randn(batch, 4, frames, h, w, generator=g), torch.rand(batch, generator=g) * 1000,
            torch.randn(batch, text, 16, generator=g), mask)


def test_block_causal_mask_and_text_mask():
    causal, full = make_model(FAMILY, "debug").eval(), make_model(FAMILY, "debug-full").eval()
    x, t, e, m = inputs()
    later = x.clone()
    later[:, :, 2] += 1.0  # change only the last latent frame
    with torch.no_grad():
        a, b = FAMILY.predict(causal, x, t, e, m), FAMILY.predict(causal, later, t, e, m)
        assert torch.equal(a[:, :, :2], b[:, :, :2])  # frames 0, 1 cannot see frame 2
        assert (a[:, :, 2] - b[:, :, 2]).abs().max() > 1e-3
        fa, fb = FAMILY.predict(full, x, t, e, m), FAMILY.predict(full, later, t, e, m)
        assert (fa[:, :, :2] - fb[:, :, :2]).abs().max() > 1e-3  # full attention: they can
        for model in (causal, full):  # invalid text tokens are never attended to
            e2 = e.clone()
            e2[-1, 5:] = torch.randn(3, 16)
            assert torch.equal(FAMILY.predict(model, x, t, e, m)[-1], FAMILY.predict(model, x, t, e2, m)[-1])
        # an empty prompt (all-false mask) is finite
        assert torch.isfinite(FAMILY.predict(causal, x, t, e, torch.zeros_like(m))).all()


def test_padding_and_mixed_resolutions_equal_unpadded():
    """A sample inside a padded batch of different-length mixed-resolution sequences gets exactly the output it
    gets alone; coarse tokens get their own positions (moving the coarse segment's level changes the output)."""
    model = make_model(FAMILY, "debug").eval()
    g = torch.Generator().manual_seed(1)
    hist = Segment(torch.randn(1, 4, 1, 4, 4, generator=g), 0, 1)
    cur = Segment(torch.randn(1, 4, 1, 8, 8, generator=g), 1, 0)
    short = Segment(torch.randn(1, 4, 1, 4, 4, generator=g), 0, 1)
    long_seq, short_seq = pack([hist, cur], 2), pack([short], 2)
    t = torch.tensor([300.0, 700.0])
    e = torch.randn(2, 8, 16, generator=g)
    with torch.no_grad():
        both = pad_batch([long_seq, short_seq])
        assert both.token_mask is not None
        out = forward_packed(model, both, t, e, None)
        alone = [forward_packed(model, s, t[i:i + 1], e[i:i + 1], None) for i, s in enumerate((long_seq, short_seq))]
        for i, s in enumerate((long_seq, short_seq)):
            n = s.tokens.shape[1]
            assert (out[i, :n] - alone[i][0]).abs().max() < 1e-5
        moved = pack([Segment(hist.latents, 0, 0), cur], 2)  # same tokens, full-resolution positions
        assert (forward_packed(model, moved, t[:1], e[:1], None) - alone[0]).abs().max() > 1e-4
    assert unpack_segment(out, both, -1, 2)[0].shape == (1, 4, 1, 8, 8)


def test_save_pretrained_roundtrip_and_family_api(tmp_path):
    model = make_model(FAMILY, "debug").eval()
    model.save_pretrained(tmp_path / "transformer")
    loaded = FAMILY.load(str(tmp_path / "transformer")).eval()
    x, t, e, m = inputs()
    with torch.no_grad():
        assert torch.equal(FAMILY.predict(model, x, t, e, m), FAMILY.predict(loaded, x, t, e, m))
    assert loaded.config.rope_axes_dim == [4, 6, 6] and loaded.config.causal is True
    assert FAMILY.prediction_type == "flow_matching" and FAMILY.pipeline_class == ""
    assert len(FAMILY.blocks(model)) == 2 and all(isinstance(b, FAMILY.block_class) for b in FAMILY.blocks(model))
    assert FAMILY.video_tokens(model, (2, 4, 3, 6, 10)) == 45
    with torch.device("meta"):
        real = FAMILY.diffusers_class.from_config(FAMILY.config("2b"))
    assert 1.9e9 < sum(p.numel() for p in real.parameters()) < 2.2e9
    with pytest.raises(ValueError, match="rope_axes_dim"):
        FAMILY.diffusers_class(attention_head_dim=16, rope_axes_dim=(4, 4, 4))
    # adaLN-Zero: a fresh model predicts zero and every block starts as the identity
    torch.manual_seed(0)
    fresh = FAMILY.load(flavor="debug")
    assert FAMILY.predict(fresh, x, t, e, m).abs().max().item() == 0.0


def _ctx(model, family=FAMILY):
    return RecipeContext.for_model(family, model)


def _batch(seed=0, b=4, frames=4, hw=8):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(b, 4, frames, hw, hw, generator=g),
            "prompt_embeds": torch.randn(b, 8, 16, generator=g),
            "prompt_attention_mask": torch.ones(b, 8, dtype=torch.long)}


def test_pyramid_flow_recipe_draws_and_gradients():
    recipe_cls = get_recipe("pyramid_flow")
    model = make_model(FAMILY, "debug")
    recipe = recipe_cls(recipe_cls.Config(caption_dropout=0.5), _ctx(model))
    batch = _batch()
    loss, metrics = recipe.loss(batch, torch.Generator().manual_seed(7))
    loss.backward()
    again, _ = recipe.loss(batch, torch.Generator().manual_seed(7))
    assert torch.isfinite(loss) and again.item() == loss.item()  # the generator alone decides every draw
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None) > 0
    d = recipe.draw(4000, 5, torch.Generator().manual_seed(0))  # stages and units are drawn per sample
    assert torch.bincount(d.stage_B, minlength=3).tolist() == pytest.approx([1333] * 3, abs=150)
    assert set(d.unit_B.tolist()) == set(range(5)) and 0 <= d.sigma_hist_B.max() <= 1 / 3
    assert 0.4 < d.drop_text_B.float().mean() < 0.6
    with pytest.raises(ValueError, match="divisible by patch_size"):
        recipe.loss(_batch(hw=6), torch.Generator())
    with pytest.raises(ValueError, match="stage_weights"):
        recipe_cls(recipe_cls.Config(stage_weights=(1.0, 1.0)), _ctx(model))
    with pytest.raises(ValueError, match="trains pyramidal families"):
        recipe_cls(recipe_cls.Config(), _ctx(model, get_family("mochi")))


def test_finetune_recipe_trains_the_pyramid_model_too():
    recipe_cls = get_recipe("finetune")
    model = make_model(FAMILY, "debug")
    recipe = recipe_cls(recipe_cls.Config(), _ctx(model))
    loss, _ = recipe.loss(_batch(), torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and model.proj_out.weight.grad.abs().sum() > 0
