"""Checkpoints and model folders from someone else are read without running their code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from fastpost.checkpoint import CheckpointManager
from fastpost.safe_load import (
    UnsafeFileError,
    dcp_load,
    load_state,
    pretrained_kwargs,
    save_state,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class _CreatesFile:
    """Unpickling this calls builtins.open(path, "w"): the file appearing proves the pickle ran code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_CreatesFile(marker))


def test_the_crafted_pickle_really_runs_code_when_unpickled(tmp_path):
    # the refusals below mean something only if plain unpickling of the same bytes would create the file
    marker = tmp_path / "proof"
    pickle.loads(_evil_pickle(marker)).close()
    assert marker.is_file()


def _trained(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(2):
        model(torch.randn(3, 4)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _save(root: Path):
    model, opt, sched = _trained()
    extra = {"scheduler": sched.state_dict(), "loader": {"epoch": 1, "position": 3}, "bad_steps": 0,
             "shape": (2, 3), "by_int": {0: "a", 7: [1.5, None]}, "__odd": True}
    ema = {"w": torch.arange(6.0).reshape(2, 3)}
    path = CheckpointManager(root).save(5, {"model": (model, opt)}, {"ema": ema}, extra)
    return path, model, opt, sched, extra, ema


def test_checkpoint_round_trip_without_pickle(tmp_path):
    path, model, opt, sched, extra, ema = _save(tmp_path)
    assert sorted(p.name for p in path.glob("extra_rank*")) == ["extra_rank00000.safetensors"]
    after_save = torch.rand(5)  # the RNG state is captured at save: loading must replay this draw

    model2, opt2, sched2 = _trained(seed=1)
    ema2 = {"w": torch.zeros(2, 3)}
    loaded = CheckpointManager(tmp_path).load(path, {"model": (model2, opt2)}, {"ema": ema2})
    assert torch.equal(torch.rand(5), after_save)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], opt2.state[p2][k])
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9) and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert torch.equal(ema2["w"], ema["w"])
    for key in ("scheduler", "loader", "bad_steps", "shape", "by_int", "__odd"):
        assert loaded[key] == extra[key], key
    assert loaded["step"] == 5 and type(loaded["shape"]) is tuple
    sched2.load_state_dict(loaded["scheduler"])
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_unsupported_extra_state_type_is_named(tmp_path):
    with pytest.raises(TypeError, match=r"'loader\.fn' is a builtin_function"):
        save_state({"loader": {"fn": len}}, tmp_path / "x.safetensors")


def test_crafted_extra_state_file_is_refused_and_never_runs(tmp_path):
    path, *_ = _save(tmp_path)
    marker = tmp_path / "pwned"
    (path / "extra_rank00000.safetensors").write_bytes(_evil_pickle(marker))
    model, opt, _ = _trained()
    with pytest.raises(UnsafeFileError, match=r"extra_rank00000\.safetensors.* is not a fastpost state file"):
        CheckpointManager(tmp_path).load(path, {"model": (model, opt)}, {"ema": {"w": torch.zeros(2, 3)}})
    assert not marker.exists()


def test_legacy_pickled_extra_state_is_refused_and_never_runs(tmp_path):
    path, *_ = _save(tmp_path)
    marker = tmp_path / "pwned"
    (path / "extra_rank00000.safetensors").unlink()
    (path / "extra_rank00000.pt").write_bytes(_evil_pickle(marker))
    model, opt, _ = _trained()
    with pytest.raises(UnsafeFileError, match=r"extra_rank00000\.pt is a pickled extra-state file"):
        CheckpointManager(tmp_path).load(path, {"model": (model, opt)}, {"ema": {"w": torch.zeros(2, 3)}})
    assert not marker.exists()


def test_crafted_dcp_metadata_is_refused_and_never_runs(tmp_path):
    path, *_ = _save(tmp_path)
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(_evil_pickle(marker))
    model, opt, _ = _trained()
    with pytest.raises(UnsafeFileError, match=r"DCP metadata .*\.metadata.* was refused.*io\.open is not part of DCP metadata"):
        CheckpointManager(tmp_path).load(path, {"model": (model, opt)}, {"ema": {"w": torch.zeros(2, 3)}})
    assert not marker.exists()


def test_crafted_non_tensor_dcp_item_is_refused_and_never_runs(tmp_path):
    # DCP stores non-tensor values as pickled bytes; torch's default planner reads them with weights_only=False
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "pwned"
    dcp.save({"x": _CreatesFile(marker), "t": torch.ones(2)}, checkpoint_id=str(tmp_path / "ck"))
    state = {"x": 0, "t": torch.zeros(2)}
    with pytest.raises(UnsafeFileError, match=r"checkpoint item 'x' was refused.*Unsupported global.*io\.open"):
        dcp_load(state, tmp_path / "ck")
    assert not marker.exists()
    dcp.save({"x": {"lr": 0.5, "betas": (0.9, 0.99)}}, checkpoint_id=str(tmp_path / "ok"))
    state = {"x": {"lr": 0.0, "betas": None}}
    dcp_load(state, tmp_path / "ok")
    assert state["x"] == {"lr": 0.5, "betas": (0.9, 0.99)}


def test_state_file_keeps_dtypes_and_is_atomic(tmp_path):
    state = {"rng": torch.get_rng_state(), "half": torch.ones(3, dtype=torch.bfloat16), "nan": float("nan")}
    save_state(state, tmp_path / "s.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]  # no .part left behind
    back = load_state(tmp_path / "s.safetensors")
    assert back["rng"].dtype == torch.uint8 and torch.equal(back["rng"], state["rng"])
    assert back["half"].dtype == torch.bfloat16 and back["nan"] != back["nan"]


# ---- pipeline components --------------------------------------------------------------------------------------
def _tiny_vae():
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    return AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                  norm_num_groups=2, temporal_compression_ratio=4)


def test_pickle_only_model_folder_needs_the_opt_in(tmp_path):
    from diffusers import AutoencoderKLCogVideoX

    vae = _tiny_vae()
    vae.save_pretrained(tmp_path / "pipe" / "vae", safe_serialization=False)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert [p.name for p in (tmp_path / "pipe" / "vae").glob("*.bin")] == ["diffusion_pytorch_model.bin"]
    for args in ((tmp_path / "pipe", False, "vae"), (tmp_path / "pipe", False, None), (tmp_path / "pipe" / "vae",)):
        with pytest.raises(UnsafeFileError, match=r"diffusion_pytorch_model\.bin.*model\.allow_pickle: true"):
            pretrained_kwargs(*args)
    kwargs = pretrained_kwargs(tmp_path / "pipe", allow_pickle=True, subfolder="vae")
    loaded = AutoencoderKLCogVideoX.from_pretrained(tmp_path / "pipe", subfolder="vae", **kwargs)
    for (n, a), (_, b) in zip(vae.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_safetensors_folder_loads_with_safetensors_only(tmp_path):
    from diffusers import AutoencoderKLCogVideoX

    vae = _tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    kwargs = pretrained_kwargs(tmp_path / "vae")
    assert kwargs == {"use_safetensors": True}
    loaded = AutoencoderKLCogVideoX.from_pretrained(tmp_path / "vae", **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), loaded.state_dict().values()))
    # a hub id cannot be inspected locally: safetensors is still demanded from from_pretrained
    assert pretrained_kwargs("THUDM/CogVideoX-2b", subfolder="vae") == {"use_safetensors": True}
