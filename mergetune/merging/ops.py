"""Building blocks shared by the merge kernels: pure tensor functions, compile-friendly.

Shapes follow the kernel convention: task vectors ``[T, R, L]``, per-row values ``[T, R, 1]``.
"""

from __future__ import annotations

import hashlib

import torch

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so that a 32-bit value times one fits in int64 without overflow:
# the hash is then exact integer arithmetic, identical on CPU and GPU, eager and compiled.
_MULT_A = 0x7FEB352D
_MULT_B = 0x6A09E667 | 1
_MULT_C = 0x5BD1E995


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _MULT_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MULT_B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * _MULT_C) & _MASK32
    return x ^ (x >> 16)


def uniform(key_lo: torch.Tensor, key_hi: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms in [0, 1): a hash of (key, element index), 24 random bits each.

    ``index`` is the element's position inside its tensor, so the draw of an entry does not depend
    on how the tensor is chunked, on the device, or on the backend (eager or compiled).
    """
    x = _mix32((index ^ key_lo) & _MASK32)
    x = _mix32(x ^ key_hi)
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


def row_uniform(key_lo: torch.Tensor, key_hi: torch.Tensor, row_offset: torch.Tensor, length: int) -> torch.Tensor:
    """Uniforms for a chunk of rows: ``row_offset`` [1, R, 1] is each row's first index in its tensor."""
    cols = torch.arange(length, device=row_offset.device, dtype=torch.int64)
    return uniform(key_lo, key_hi, row_offset + cols)


def tensor_keys(seed: int, tensor_name: str, n_tasks: int) -> list[tuple[int, int]]:
    """Two 32-bit keys per task, from the recipe's seed, the tensor's name and the task index."""
    keys = []
    for t in range(n_tasks):
        digest = hashlib.sha256(f"{seed}\x00{tensor_name}\x00{t}".encode()).digest()
        keys.append((int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")))
    return keys


def trim(tau: torch.Tensor, magnitude: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Keep the entries whose magnitude reaches the threshold (ties kept); zero the rest."""
    return torch.where(magnitude >= threshold, tau, torch.zeros_like(tau))


def elect_sign(voted: torch.Tensor) -> torch.Tensor:
    """TIES sign election over tasks (dim 0): the sign of the sum; where it is exactly 0, the majority.

    ``voted`` holds the trimmed task vectors, multiplied by their weights when weights are applied
    before the election. Returns γ in {-1, 0, +1}; 0 only where no task votes or the votes tie.
    """
    total = voted.sum(0)
    votes = torch.sign(voted).sum(0)
    return torch.where(total != 0, torch.sign(total), torch.sign(votes))


def agreeing(voted: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Mask of the non-zero entries whose sign matches the elected sign."""
    return (voted * gamma) > 0


def disjoint_merge(trimmed: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Combine the agreeing entries: ``sum``, ``mean`` (over agreeing tasks) or ``weighted_mean``.

    - ``sum``: Σ_t λ_t τ_t m_t (FusionBench/AdaMerging "dis-sum");
    - ``mean``: Σ_t λ_t τ_t m_t / max(1, Σ_t m_t) (official TIES "dis-mean", λ_t per task);
    - ``weighted_mean``: Σ_t λ_t τ_t m_t / Σ_t λ_t m_t, 0/0 -> 0 (mergekit ``normalize: true``, DELLA).
    """
    maskf = mask.to(trimmed.dtype)
    num = (trimmed * weight * maskf).sum(0)
    if how == "sum":
        return num
    if how == "mean":
        return num / maskf.sum(0).clamp(min=1.0)
    den = (weight * maskf).sum(0)
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))
