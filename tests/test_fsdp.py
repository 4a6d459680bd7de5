"""FSDP2 (+ Ulysses, HSDP, ring, offload, LoRA, bf16) training equals single-process training after 3 AdamW steps."""


import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from fastpost.distributed import ParallelDims
from fastpost.distributed.activation_checkpoint import ACConfig
from fastpost.distributed.fsdp import FSDPConfig
from fastpost.models.toy import FLAVORS, ToyDiT, parallelize
from tests._harness import run_distributed

STEPS, GLOBAL_BATCH, TOKENS, TEXT = 3, 4, 13, 5  # 13 tokens: not divisible by sp=2 or 4


def make_batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = FLAVORS["debug"]
    return [
        (torch.randn(GLOBAL_BATCH, TOKENS, cfg.in_channels, generator=g),
         torch.randn(GLOBAL_BATCH, TEXT, cfg.text_dim, generator=g),
         torch.rand(GLOBAL_BATCH, generator=g),
         torch.randn(GLOBAL_BATCH, TOKENS, cfg.in_channels, generator=g))
        for _ in range(STEPS)
    ]


def make_model(lora: bool) -> ToyDiT:
    torch.manual_seed(0)
    model = ToyDiT(FLAVORS["debug"])
    if lora:
        from peft import LoraConfig, inject_adapter_in_model

        model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["qkv", "proj"], init_lora_weights=False), model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    return model


def make_optimizer(model, kind: str):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01) if kind == "adamw" else torch.optim.SGD(params, lr=0.1)


def train(model, batches, dp_rank=0, dp_size=1, opt_kind="adamw"):
    opt = make_optimizer(model, opt_kind)
    per_rank = GLOBAL_BATCH // dp_size
    losses = []
    for x, text, t, target in batches:
        sl = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        loss = F.mse_loss(model(x[sl], text[sl], t[sl]), target[sl])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float() for n, p in model.named_parameters()}


CASES = [
    # name, dims kwargs, fsdp cfg, ac mode, lora, tolerance (fp32: max abs param error; bf16: relative update error)
    ("dp2xsp2", dict(ulysses=2), FSDPConfig(), "none", False, 1e-5),
    ("dp2xsp2_selective_ac", dict(ulysses=2), FSDPConfig(), "selective", False, 1e-5),
    ("hsdp_rep2xsp2", dict(dp_replicate=2, ulysses=2), FSDPConfig(), "full", False, 1e-5),
    ("ring2xulysses2", dict(ulysses=2, ring=2), FSDPConfig(), "none", False, 1e-5),
    ("sp4_cpu_offload", dict(ulysses=4), FSDPConfig(cpu_offload=True, reshard_after_forward=False), "every_n", False, 1e-5),
    ("dp2xsp2_lora_frozen_base", dict(ulysses=2), FSDPConfig(), "none", True, 1e-5),
    # bf16 compute, fp32 reduce. Measured relative update error ||dθ - dθ_ref|| / ||dθ_ref||: SGD 0.012 (the bf16
    # gradient error; the same 0.012 without SP, so it is rounding, not SP), AdamW 0.18 (Adam normalises each
    # element, so bf16 noise on near-zero gradients becomes full-size steps).
    ("dp2xsp2_bf16_sgd", dict(ulysses=2), FSDPConfig(param_dtype="bfloat16"), "none", False, 0.03),
    ("dp2xsp2_bf16_adamw", dict(ulysses=2), FSDPConfig(param_dtype="bfloat16"), "none", False, 0.25),
]


def _worker(rank, world, case_names):
    batches = make_batches()
    errors = {}
    for name, dims_kw, fsdp_cfg, ac_mode, lora, tol in CASES:
        if name not in case_names:
            continue
        ref = make_model(lora)
        init = {n: p.detach().clone() for n, p in ref.named_parameters()}
        opt_kind = "sgd" if name.endswith("_sgd") else "adamw"
        ref_losses = train(ref, batches, opt_kind=opt_kind)

        dims = ParallelDims(world_size=world, **dims_kw)
        dims.build_mesh("cpu")
        model = parallelize(make_model(lora), dims, ac=ACConfig(mode=ac_mode), fsdp=fsdp_cfg)
        losses = train(model, batches, dims.dp_rank, dims.dp, opt_kind)

        got, want = full_params(model), full_params(ref)
        if "bf16" in name:
            diff = sum(((got[n] - want[n]) ** 2).sum() for n in want).sqrt()
            err = (diff / sum(((want[n] - init[n]) ** 2).sum() for n in want).sqrt()).item()
        else:
            err = max((got[n] - want[n]).abs().max().item() for n in want)
        moved = max((want[n] - init[n]).abs().max().item() for n in want)
        assert moved > 1e-2, f"{name}: reference did not train (max update {moved})"
        if lora:  # the frozen base must not move at all
            for n, p in got.items():
                if "lora_" not in n:
                    assert torch.equal(p, init[n]), f"{name}: frozen {n} changed"
        errors[name] = err
        assert err <= tol, f"{name}: param error {err:.3e} > {tol} (local losses {losses} vs {ref_losses})"
    if rank == 0:
        print("param error after", STEPS, "steps:", {k: f"{v:.1e}" for k, v in errors.items()})


@pytest.mark.parametrize("group", [[c[0] for c in CASES[:4]], [c[0] for c in CASES[4:]]], ids=["layouts", "offload_lora_bf16"])
def test_fsdp_sp_training_matches_single_process(group):
    run_distributed(_worker, 4, group)


def test_fsdp_world2_pure_data_parallel():
    run_distributed(_worker_dp2, 2)


def _worker_dp2(rank, world):
    batches = make_batches(1)
    ref = make_model(False)
    train(ref, batches)
    dims = ParallelDims(world_size=world)  # dp_shard inferred = 2
    dims.build_mesh("cpu")
    assert dims.dp_shard == 2 and not dims.sp_enabled
    model = parallelize(make_model(False), dims)
    train(model, batches, dims.dp_rank, dims.dp)
    got, want = full_params(model), full_params(ref)
    err = max((got[n] - want[n]).abs().max().item() for n in want)
    assert err <= 1e-5, err
