"""The GPU-shaped hot loop, proven on CPU: masked text as one batched varlen call, selective AC saving every
registered backend's attention op, regional compile, prefetching loader, device-side metrics and skip."""

from __future__ import annotations

import copy

import pytest
import torch

from fastpost import attention as attn_lib
from fastpost.distributed import ParallelDims
from fastpost.models import get_family
from tests._parity import forward_backward, reference
from tests.test_models_mochi import make_batch

MOCHI = get_family("mochi")


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """flash-attn's varlen contract in plain torch (host loop: a test oracle only)."""
    out = torch.empty_like(q)
    for i in range(cu_q.numel() - 1):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        assert qs.stop - qs.start <= max_q and ks.stop - ks.start <= max_k
        scores = torch.einsum("qhd,khd->hqk", q[qs], k[ks]) * scale
        out[qs] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[ks])
    return out


def _no_mask_kernel(q, k, v, mask, scale):
    assert mask is None, "a key-padding mask must take the varlen path"
    return attn_lib._math_kernel(q, k, v, None, scale)


@pytest.fixture
def varlen_backend():
    attn_lib.register_backend(attn_lib.AttentionBackend("test_varlen", _no_mask_kernel, lambda: True,
                                                        lambda q, k, v, m: None, varlen=_reference_varlen))
    yield "test_varlen"
    attn_lib._REGISTRY.pop("test_varlen")


@pytest.mark.parametrize("backend", ["sdpa", "varlen"])
def test_masked_text_one_batched_call_equals_diffusers_per_sample(backend, varlen_backend):
    """Samples with 8, 3, 0 and 4 (not a prefix) valid text tokens in one batch: the batched masked call (SDPA
    with a key mask, or flash-attn's varlen contract with keys packed on the device) equals diffusers' per-sample
    loop, outputs and gradients."""
    name = varlen_backend if backend == "varlen" else "sdpa"
    batch = make_batch()
    init, pred, grads = reference(MOCHI, "debug", batch)
    model = copy.deepcopy(init)
    MOCHI.apply_sequence_parallel(model, ParallelDims(world_size=1), name)
    out = forward_backward(MOCHI, model, batch)
    assert (out - pred).abs().max().item() < 1e-5
    err = max((p.grad - grads[n]).abs().max().item() for n, p in model.named_parameters() if p.grad is not None)
    assert err < 1e-5


def test_selective_ac_saves_the_op_of_a_backend_registered_later():
    """Selective AC's saved-op list comes from the backend registry: a backend registered here (a custom torch op)
    runs once in forward+backward under selective AC (saved), twice under full AC (recomputed)."""
    from fastpost.distributed.activation_checkpoint import checkpoint_module

    calls = []

    @torch.library.custom_op("fastpost_test::attn", mutates_args=())
    def test_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        calls.append(1)
        return attn_lib._math_kernel(q, k, v, None, scale)

    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            out = attn_lib._math_kernel(q, k, v, None, ctx.scale)
        return (*torch.autograd.grad(out, (q, k, v), grad), None)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3])
        ctx.scale = inputs[3]

    test_attn.register_autograd(backward, setup_context=setup)
    attn_lib.register_backend(attn_lib.AttentionBackend(
        "test_op", lambda q, k, v, m, s: test_attn(q, k, v, s), lambda: True, lambda q, k, v, m: None,
        saved_ops=("fastpost_test.attn.default",)))
    try:
        counts = {}
        for selective in (True, False):
            block = torch.nn.Linear(16, 48)

            def fwd(x, lin=block):
                q, k, v = lin(x).unflatten(-1, (3, 2, 8)).unbind(2)
                return attn_lib.attention(q, k, v, backend="test_op").sum()

            module = torch.nn.Module()
            module.forward = fwd
            checkpoint_module(module, selective=selective)
            calls.clear()
            module(torch.randn(2, 5, 16, requires_grad=True)).backward()
            counts[selective] = len(calls)
        assert counts == {True: 1, False: 2}
    finally:
        attn_lib._REGISTRY.pop("test_op")


def test_regional_compile_equals_eager_fp32():
    """compile.enabled: each block torch.compile'd in place (names unchanged) after AC; forward and gradients
    equal eager in fp32. One block (the context_pre_only kind) and the eager backend (dynamo graph capture without
    inductor codegen, which takes 10-150 s on this box) keep it cheap; bench_train_step runs inductor."""
    from fastpost.distributed.activation_checkpoint import ACConfig
    from fastpost.distributed.compile import CompileConfig

    cfg = {**MOCHI.config("debug"), "num_layers": 1}
    torch.manual_seed(0)
    eager = MOCHI.diffusers_class.from_config(cfg)
    compiled = copy.deepcopy(eager)
    names = [n for n, _ in eager.named_parameters()]
    dims = ParallelDims(world_size=1)
    MOCHI.parallelize(eager, dims, ACConfig(mode="none"))
    MOCHI.parallelize(compiled, dims, ACConfig(mode="none"), compile=CompileConfig(enabled=True, backend="eager"))
    assert [n for n, _ in compiled.named_parameters()] == names
    batch = make_batch()
    out_e = forward_backward(MOCHI, eager, batch)
    out_c = forward_backward(MOCHI, compiled, batch)
    assert compiled.transformer_blocks[0]._compiled_call_impl is not None
    assert (out_c - out_e).abs().max().item() < 1e-5
    grads_e = dict(eager.named_parameters())
    err = max((p.grad - grads_e[n].grad).abs().max().item() for n, p in compiled.named_parameters())
    assert err < 1e-5


def test_prefetching_loader_same_batches_and_state(tmp_path):
    """forever() with prefetch (a background thread) yields exactly the batches of the in-thread reader, across
    epoch boundaries, with the same state_dict after every batch; a resume from a mid-run state continues alike."""
    from fastpost.data import shards
    from fastpost.data.loader import ShardLoader

    shards.create_manifest(tmp_path, {"note": "prefetch test"})
    samples = [{"latents": torch.full((4, 1 + i % 2, 2, 2), float(i)), "prompt_embeds": torch.full((6, 8), float(i)),
                "prompt_attention_mask": torch.ones(6, dtype=torch.long), "caption": f"s{i}", "source": f"{i}.mp4",
                "bucket": f"f{1 + i % 2}"} for i in range(11)]
    shards.append_manifest(tmp_path, shards.write_shard(tmp_path, 0, samples))

    def run(prefetch, state=None, n=13):
        loader = ShardLoader(tmp_path, batch_size=2, dp_rank=1, dp_size=2, seed=5, prefetch=prefetch)
        if state is not None:
            loader.load_state_dict(state)
        it, out = loader.forever(), []
        for _ in range(n):
            batch = next(it)
            out.append((batch["indices"], batch["latents"].clone(), loader.state_dict()))
        loader.close()
        return out

    plain, ahead = run(0), run(3)
    for (i0, x0, s0), (i1, x1, s1) in zip(plain, ahead):
        assert i0 == i1 and torch.equal(x0, x1) and s0 == s1
    assert plain[-1][2]["epoch"] >= 2  # crossed epoch boundaries (3 batches per rank per epoch)
    resumed = run(3, state=plain[4][2], n=8)
    assert [r[0] for r in resumed] == [p[0] for p in plain[5:]]
