"""The demo model's parallel plans change nothing but placement: TP=2 (with and without sequence parallel)
and FSDP2 on DP=2 reproduce the single-process loss, gradients and update, on 2 gloo CPU ranks in float64."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import run_distributed
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from ce_guard import CEContract
from ce_guard.demos.hybrid import HybridConfig, HybridLM, LinearCrossEntropy
from ce_guard.demos.parallelize import apply_fsdp, apply_tp
from ce_guard.fused import FusedLinearCrossEntropy

pytestmark = pytest.mark.distributed

# float64 so that only a wrong plan, not a different summation order, can break the equality.
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _config() -> HybridConfig:
    return HybridConfig(vocab_size=256, d_model=32, layer_pattern="M*-M-*", n_heads=4, n_kv_heads=2,
                        mamba_n_heads=4, mamba_head_dim=8, mamba_n_groups=2, mamba_d_state=8, mamba_d_conv=4,
                        mamba_chunk_size=8, max_seq_len=64)


def _model() -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(_config(), lambda c: LinearCrossEntropy(c.d_model, c.vocab_size)).double()


def _batch(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 256, (batch, seq), generator=g)
    targets = torch.randint(0, 256, (batch, seq), generator=g)
    return input_ids, targets


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _plain_name(name: str) -> str:
    """``mixer.parametrizations.A_log.original`` -> ``mixer.A_log`` (see parallelize._LocalShard)."""
    return name.replace("parametrizations.", "").replace(".original", "")


def _check_tp(mesh: DeviceMesh, sequence_parallel: bool) -> None:
    ref, tp = _model(), _model()
    apply_tp(tp, mesh, sequence_parallel=sequence_parallel)
    input_ids, targets = _batch(2, 22)
    targets[0, -5:] = -100  # padding must not change the answer either

    seen = []
    tp.output.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    ref_loss = ref(input_ids, targets)
    ref_loss.backward()
    tp_loss = tp(input_ids, targets)
    tp_loss.backward()

    if sequence_parallel:  # an uneven split would hang the collectives, so it must fail fast instead
        with pytest.raises(ValueError, match="multiple of the TP degree 2"):
            tp(input_ids[:, :21], targets[:, :21])
    # The output module's side of the seam: a plain, full (B, S, D) tensor, whatever the TP layout.
    assert type(seen[0]) is torch.Tensor and seen[0].shape == (2, 22, 32)

    torch.testing.assert_close(tp_loss, ref_loss, **TOL)
    torch.testing.assert_close(_full(tp.forward_hidden(input_ids)), ref.forward_hidden(input_ids), **TOL)
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}
    tp_grads = {_plain_name(name): _full(p.grad) for name, p in tp.named_parameters()}
    assert tp_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        # The Mamba mixer keeps its gate and dt in fp32 (hybrid.py) even for float64 weights, so TP and TP=1 agree
        # to fp32 rounding of the tensor's scale, not each element's: on this 2-core CPU (torch 2.13) cancelling
        # elements of x_proj's / B_proj's gradients came out 2e-12 off (relative 4e-9 to 5e-8) over a flat 1e-12.
        atol = max(TOL["atol"], 8 * torch.finfo(torch.float32).eps * float(grad.abs().max()))
        torch.testing.assert_close(tp_grads[name], grad, rtol=TOL["rtol"], atol=atol,
                                   msg=lambda m, name=name: f"SP={sequence_parallel}, {name}: {m}")


def _check_vocab_parallel_output(mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """The demo as it will run: ce_guard's fused layer holding this rank's vocab slice behind the TP plan."""
    ref = _model()
    rank, config = mesh.get_local_rank(), ref.config
    rows = slice(rank * config.vocab_size // mesh.size(), (rank + 1) * config.vocab_size // mesh.size())
    contract = CEContract(vocab_size=config.vocab_size, layout="[S,B,V/TP]", vocab_start=rows.start,
                          vocab_end=rows.stop, tp_group=mesh.get_group())
    tp = HybridLM(config, lambda c: FusedLinearCrossEntropy(c.d_model, contract)).double()
    tp.load_state_dict({**ref.state_dict(), "output.weight": ref.output.weight.detach()[rows]})
    apply_tp(tp, mesh, sequence_parallel=sequence_parallel)
    input_ids, targets = _batch(2, 22)
    targets[0, -5:] = -100
    ref_loss = ref(input_ids, targets)
    ref_loss.backward()
    loss = tp(input_ids, targets)
    loss.backward()
    # The fused layer accumulates in fp32 (its contract's accum_dtype), so ~1e-7 relative, not float64's.
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=0)
    ref_params = dict(ref.named_parameters())
    for name, p in tp.named_parameters():
        want = ref_params[_plain_name(name)].grad
        want = want[rows] if name == "output.weight" else want
        err = (_full(p.grad) - want).abs().max() / want.abs().max()
        assert err < 1e-6, f"SP={sequence_parallel}, {name}: relative error {err:.2e}"


def _tp_worker(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)  # two ranks share two cores
    mesh = init_device_mesh("cpu", (world_size,))
    for sequence_parallel in (False, True):  # one spawn for all: starting ranks costs more than checking
        _check_tp(mesh, sequence_parallel)
        _check_vocab_parallel_output(mesh, sequence_parallel)


def test_tp2_matches_tp1_with_and_without_sequence_parallel() -> None:
    """With a plain full-vocab output layer (float64, exact) and with ce_guard's vocab-parallel fused one."""
    run_distributed(_tp_worker, 2)


def _fsdp_worker(rank: int, world_size: int, steps: int) -> None:
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world_size,))
    ref, sharded = _model(), _model()
    apply_fsdp(sharded, mesh)
    # SGD, not Adam: Adam's first step is ~sign(grad), which turns a 1e-16 difference in a near-zero
    # gradient into an O(lr) difference in the weight and would hide what this test checks.
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(sharded.parameters(), lr=0.1, momentum=0.9)
    input_ids, targets = _batch(2 * world_size, 16)
    mine = slice(2 * rank, 2 * rank + 2)  # this rank's half of the global batch
    for _ in range(steps):
        # Equal token counts per rank, so FSDP's average of per-rank means is the global mean.
        ref_opt.zero_grad()
        ref(input_ids, targets).backward()
        ref_opt.step()
        opt.zero_grad()
        sharded(input_ids[mine], targets[mine]).backward()
        opt.step()
    for (name, p), (_, q) in zip(ref.named_parameters(), sharded.named_parameters(), strict=True):
        torch.testing.assert_close(_full(q.detach()), p.detach(), **TOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_fsdp2_step_matches_single_process() -> None:
    run_distributed(_fsdp_worker, 2, 2)


def _fsdp_tp_worker(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    ref, parallel = _model(), _model()
    apply_tp(parallel, mesh["tp"], sequence_parallel=True)
    apply_fsdp(parallel, mesh["dp"])  # the Mamba parameters kept as Shard(0) DTensors become 2-D here
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(parallel.parameters(), lr=0.1, momentum=0.9)
    input_ids, targets = _batch(4, 16)
    dp_rank = mesh["dp"].get_local_rank()
    mine = slice(2 * dp_rank, 2 * dp_rank + 2)
    for _ in range(2):
        ref_opt.zero_grad()
        ref(input_ids, targets).backward()
        ref_opt.step()
        opt.zero_grad()
        parallel(input_ids[mine], targets[mine]).backward()
        opt.step()
    ref_params = dict(ref.named_parameters())
    for name, p in parallel.named_parameters():
        torch.testing.assert_close(_full(p.detach()), ref_params[_plain_name(name)].detach(), **TOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_fsdp2_over_tp2_matches_single_process() -> None:
    """2-D (DP=2 x TP=2, sequence parallel) on 4 ranks: the plan an H100 node would run, shrunk."""
    run_distributed(_fsdp_tp_worker, 4)
