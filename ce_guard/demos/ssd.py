"""Mamba-2's state-space duality (SSD) scan in plain PyTorch: the chunked form and a per-step reference.

The chunked form follows ``ssd_minimal_discrete`` from the Mamba-2 paper (Dao & Gu, 2024, listing 1):
inside a chunk the scan is a masked attention-like matmul, across chunks a short recurrence carries the
state. It runs on any device; the CUDA kernels of ``mamba_ssm`` are deliberately not used so the demo
has one code path that CPU tests cover.

Notation (shared by both functions):
    x:  (B, L, H, P)  inputs per head, P = head dim
    dt: (B, L, H)     positive step sizes (softplus already applied)
    A:  (H,)          negative decay rates; the discrete decay of a step is exp(dt * A)
    Bm: (B, L, G, N)  input projections per group, N = state size, H divisible by G
    Cm: (B, L, G, N)  output projections per group
    state: (B, H, P, N)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat


def _scan_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 at least: exp of a long cumulative sum of decays underflows in bf16 within a few steps."""
    return torch.promote_types(dtype, torch.float32)


def _check_shapes(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor,
                  Cm: torch.Tensor) -> None:
    b, seq, h, _ = x.shape
    if dt.shape != (b, seq, h) or A.shape != (h,):
        raise ValueError(f"Expected dt of shape {(b, seq, h)} and A of shape {(h,)} for x of shape "
                         f"{tuple(x.shape)}, got dt {tuple(dt.shape)} and A {tuple(A.shape)}.")
    if Bm.shape != Cm.shape or Bm.shape[:2] != (b, seq) or h % Bm.shape[2] != 0:
        raise ValueError(f"Expected B and C of shape (B, L, G, N) with G dividing H={h}, got B "
                         f"{tuple(Bm.shape)} and C {tuple(Cm.shape)}.")


def segsum(a: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for j <= i, and -inf above the diagonal.

    Built by masking before the cumsum (the paper's stable variant), so no difference of two large
    cumulative sums is ever taken.
    """
    t = a.size(-1)
    a = repeat(a, "... d -> ... d e", e=t)  # (..., T, T), a[..., i, j] = a_i
    below = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=-1)
    a = a.masked_fill(~below, 0)
    out = torch.cumsum(a, dim=-2)
    on_or_below = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~on_or_below, -torch.inf)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    *,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan: ``(y, final_state)``, y (B, L, H, P) in x's dtype, state (B, H, P, N) in fp32+.

    L need not be a multiple of ``chunk_size``: the tail is padded with dt = 0 (decay 1, no input),
    which leaves both the outputs and the final state unchanged.

    Example:
        >>> y, state = ssd_chunked(x, dt, A, Bm, Cm, chunk_size=64)
    """
    if chunk_size < 1:
        raise ValueError(f"Expected `chunk_size` >= 1, got {chunk_size}.")
    _check_shapes(x, dt, A, Bm, Cm)
    out_dtype, dtype = x.dtype, _scan_dtype(x.dtype)
    seq, heads, groups = x.shape[1], x.shape[2], Bm.shape[2]
    x, dt, A, Bm, Cm = (t.to(dtype) for t in (x, dt, A, Bm, Cm))
    Bm = repeat(Bm, "b l g n -> b l (g r) n", r=heads // groups)  # (B, L, H, N), head h reads group h // r
    Cm = repeat(Cm, "b l g n -> b l (g r) n", r=heads // groups)

    pad = (-seq) % chunk_size
    if pad:
        x, Bm, Cm = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, Bm, Cm))
        dt = F.pad(dt, (0, 0, 0, pad))
    xdt = x * dt.unsqueeze(-1)  # (B, L', H, P) discretised input
    adt = dt * A  # (B, L', H) log-decay per step

    xdt, Bm, Cm = (rearrange(t, "b (c l) ... -> b c l ...", l=chunk_size) for t in (xdt, Bm, Cm))
    adt = rearrange(adt, "b (c l) h -> b h c l", l=chunk_size)  # (B, H, C, l)
    a_cumsum = torch.cumsum(adt, dim=-1)

    # 1. Within each chunk: y = (C B^T * decay mask) x, the "attention" half of the duality.
    decay = torch.exp(segsum(adt))  # (B, H, C, l, l)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cm, Bm, decay, xdt)

    # 2. The state each chunk would leave behind if it started from zero.
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # (B, H, C, l)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bm, decay_to_end, xdt)  # (B, C, H, P, N)

    # 3. Across chunks: carry the state with each chunk's total decay (a recurrence over C+1 entries).
    if initial_state is None:
        initial_state = torch.zeros_like(states[:, :1])
    else:
        initial_state = initial_state.to(dtype).unsqueeze(1)  # (B, 1, H, P, N)
    states = torch.cat([initial_state, states], dim=1)  # (B, C+1, H, P, N)
    chunk_decay = torch.exp(segsum(F.pad(a_cumsum[..., -1], (1, 0))))  # (B, H, C+1, C+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final_state = states[:, :-1], states[:, -1]  # state entering each chunk, state after the last

    # 4. What the carried-in state contributes to each position of its chunk.
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cm, states, torch.exp(a_cumsum))

    y = rearrange(y_diag + y_off, "b c l h p -> b (c l) h p")[:, :seq]  # (B, L, H, P)
    return y.to(out_dtype), final_state


def ssd_sequential_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    Bm: torch.Tensor,
    Cm: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence by definition, one step at a time: slow, and obviously right.

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t B_t^T;   y_t = state_t C_t
    """
    _check_shapes(x, dt, A, Bm, Cm)
    out_dtype, dtype = x.dtype, _scan_dtype(x.dtype)
    b, seq, heads, p = x.shape
    n, r = Bm.shape[-1], heads // Bm.shape[2]
    x, dt, A, Bm, Cm = (t.to(dtype) for t in (x, dt, A, Bm, Cm))
    Bm, Cm = Bm.repeat_interleave(r, dim=2), Cm.repeat_interleave(r, dim=2)  # (B, L, H, N)
    state = x.new_zeros(b, heads, p, n) if initial_state is None else initial_state.to(dtype)
    ys = []
    for t in range(seq):
        step_decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (B, H, 1, 1)
        update = (dt[:, t, :, None] * x[:, t])[..., None] * Bm[:, t, :, None, :]  # (B, H, P, N)
        state = step_decay * state + update
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Cm[:, t]))
    return torch.stack(ys, dim=1).to(out_dtype), state
