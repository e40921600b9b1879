"""Building blocks shared by the merge kernels: pure tensor functions, compile-friendly.

Kernels work **task by task**: ``tau.unbind(0)`` gives one ``[R, L]`` chunk per task, per-row
arguments unbind to ``[R, 1]``, and every operation below takes or returns such per-task
sequences. Sums over tasks are unrolled (x_0 + x_1 + ...), never ``x.sum(0)`` on a ``[T, R, L]``
tensor: torch.compile then fuses a whole kernel into one pointwise loop over the chunk instead of
materialising ``[T, R, L]`` intermediates and running a reduction kernel per sum (measured on
MiniLM, 8 tasks, one thread: TIES 0.33-0.55 s -> 0.085 s per candidate, TA 0.066 s).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_SIGN32 = 1 << 31
# Odd multipliers below 2**31: each is an int32 constant, so the products below stay in int32.
_MULT_A = 0x7FEB352D
_MULT_B = 0x6A09E667 | 1
_MULT_C = 0x5BD1E995


_ROUNDS = ((16, _MULT_A), (15, _MULT_B), (13, _MULT_C))  # (x ^= x >> shift; x *= mult) mod 2**32, then x ^= x >> 16


def _signed32(a: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of integers as int32 (two's complement), with no out-of-range cast."""
    return (((a + _SIGN32) & _MASK32) - _SIGN32).to(torch.int32)


def _lshr(x: torch.Tensor, shift: int) -> torch.Tensor:
    """The logical right shift of int32 bits (torch's ``>>`` on int32 copies the sign bit)."""
    return (x >> shift) & ((1 << (32 - shift)) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The mixer on uint32 values held as int32 bits: products wrap modulo 2**32 as two's complement."""
    for shift, mult in _ROUNDS:
        x = (x ^ _lshr(x, shift)) * mult
    return x ^ _lshr(x, 16)


def uniform(key_lo: torch.Tensor, key_hi: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Counter-based uniforms in [0, 1): a hash of (key, element index), 24 random bits each.

    ``index`` is the element's position inside its tensor, so the draw of an entry does not depend
    on how the tensor is chunked, on the device, or on the backend (eager or compiled).

    The arithmetic is modulo 2**32 on int32 tensors, whose products wrap (vpmulld, imul, CUDA's
    mul.lo): compiled on a CPU it vectorises 8 lanes wide, where the same hash in int64 (masked to 32
    bits) needs 64-bit multiplies that AVX2 lacks and ran 3.2x slower per entry (compiled DARE
    kernel, 8 M entries, two threads: 3.65 -> 1.15 ns per entry). The tests check every path against
    the hash written in Python integers.
    """
    x = _mix32(_signed32(index) ^ _signed32(key_lo))
    x = _mix32(x ^ _signed32(key_hi))
    return _lshr(x, 8).to(torch.float32) * (1.0 / (1 << 24))


def row_uniform(key_lo: torch.Tensor, key_hi: torch.Tensor, row_offset: torch.Tensor, length: int) -> torch.Tensor:
    """Uniforms for a chunk of rows: ``row_offset`` [R, 1] is each row's first index in its tensor, the
    keys are [R, 1] (or broadcast to it). Eager on the CPU, the same bits come from ``_cpu_row_uniform``."""
    if row_offset.device.type == "cpu" and not torch.compiler.is_compiling():
        return _cpu_row_uniform(key_lo, key_hi, row_offset, length)
    cols = torch.arange(length, device=row_offset.device, dtype=torch.int64)
    return uniform(key_lo, key_hi, row_offset + cols)


# Eager CPU kernels run one operation at a time over the whole chunk; the hash is ~20 of them, each a pass
# over int64 temporaries in memory, with 64-bit multiplies that AVX2 lacks. The same arithmetic modulo 2**32
# in numpy's uint32 (whose products wrap by definition), in place, on blocks that stay in the L2 cache:
# 6.3 M uniforms on one thread in 0.05 s instead of 1.3 s. (A chunk's rows split over two threads ran slower,
# measured: the blocks of one chunk are too few to share.)
_UNIT = np.float32(1.0 / (1 << 24))
_HASH_BLOCK = 1 << 16  # 256 KiB of uint32, twice (value and temporary): measured best of 2**12..2**18


def _cpu_row_uniform(key_lo: torch.Tensor, key_hi: torch.Tensor, row_offset: torch.Tensor, length: int) -> torch.Tensor:
    rows = np.broadcast_shapes(key_lo.shape, key_hi.shape, row_offset.shape)[:-1]  # torch's is 10x slower
    out = torch.empty(*rows, length, dtype=torch.float32)
    _cpu_row_hash(key_lo, key_hi, row_offset, out, below=None)
    return out


def row_keep_bits(
    key_lo: torch.Tensor, key_hi: torch.Tensor, row_offset: torch.Tensor, length: int, keep_prob: torch.Tensor
) -> torch.Tensor:
    """int32 ``[R, length]`` on the CPU: all ones where ``row_uniform(...) < keep_prob`` (``[R, 1]``), else 0.

    ANDed with float32 bits it is ``torch.where(u < p, x, 0.0)`` bit for bit, without a branch per entry: a
    select on a random mask mispredicts half its branches (4-5 ns per entry on this CPU, as much as the hash;
    the AND: under 0.2). u < p compares (x >> 8) · 2⁻²⁴ with p exactly, so it is (x >> 8) < ⌈p · 2²⁴⌉ on the
    integers, computed in the hash's own blocks."""
    rows = np.broadcast_shapes(key_lo.shape, key_hi.shape, row_offset.shape, keep_prob.shape)[:-1]
    below = torch.ceil(keep_prob.to(torch.float64) * (1 << 24)).clamp(0, 1 << 24).to(torch.int64)
    out = torch.empty(*rows, length, dtype=torch.int32)
    _cpu_row_hash(key_lo, key_hi, row_offset, out, below=below)
    return out


def _cpu_row_hash(
    key_lo: torch.Tensor, key_hi: torch.Tensor, row_offset: torch.Tensor, out: torch.Tensor, below: torch.Tensor | None
) -> None:
    """The hash of every entry of ``out`` ``[*rows, L]``, block by block: written as uniforms (float32 ``out``),
    or, with ``below`` (per row), as int32 masks of (hash >> 8) < below."""
    if out.numel() == 0:
        return
    length = out.shape[-1]
    rows = out.shape[:-1]
    lo, hi, off = (_low32(a.expand(*rows, 1)) for a in (key_lo, key_hi, row_offset))
    limit = None if below is None else _low32(below.expand(*rows, 1))
    flat_out = out.view(-1, length).numpy()
    width = min(length, _HASH_BLOCK)
    height = max(1, _HASH_BLOCK // width)
    x, tmp = np.empty(height * width, dtype=np.uint32), np.empty(height * width, dtype=np.uint32)
    cols = np.arange(length, dtype=np.uint32)
    for r0 in range(0, flat_out.shape[0], height):
        r = slice(r0, min(r0 + height, flat_out.shape[0]))
        for c0 in range(0, length, width):
            c = slice(c0, min(c0 + width, length))
            n = (r.stop - r.start) * (c.stop - c.start)
            xb, tb = x[:n].reshape(r.stop - r.start, -1), tmp[:n].reshape(r.stop - r.start, -1)
            np.add(off[r], cols[c], out=xb)  # the index mod 2**32
            xb ^= lo[r]
            _mix32_inplace(xb, tb)
            xb ^= hi[r]
            _mix32_inplace(xb, tb)
            xb >>= 8
            if limit is None:
                np.multiply(xb, _UNIT, out=flat_out[r, c], casting="unsafe")  # (x >> 8) / 2**24: exact in float32
            else:  # both below 2**25: x − below wraps to a top bit set exactly where x < below
                xb -= limit[r]
                np.right_shift(xb.view(np.int32), 31, out=flat_out[r, c])  # arithmetic shift: all ones or 0


def _low32(a: torch.Tensor) -> np.ndarray:
    """The low 32 bits of int64 values, as a [rows, 1] uint32 array."""
    return (a.reshape(-1, 1) & _MASK32).numpy().astype(np.uint32)


def _mix32_inplace(x: np.ndarray, tmp: np.ndarray) -> None:
    """``_mix32`` on uint32 values, in place."""
    for shift, mult in _ROUNDS:
        np.right_shift(x, shift, out=tmp)
        x ^= tmp
        x *= np.uint32(mult)
    np.right_shift(x, 16, out=tmp)
    x ^= tmp


def tensor_keys(seed: int, tensor_name: str, n_tasks: int) -> list[tuple[int, int]]:
    """Two 32-bit keys per task, from the recipe's seed, the tensor's name and the task index."""
    keys = []
    for t in range(n_tasks):
        digest = hashlib.sha256(f"{seed}\x00{tensor_name}\x00{t}".encode()).digest()
        keys.append((int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")))
    return keys


Tensors = Sequence[torch.Tensor]


def per_task(fn: Callable[..., torch.Tensor], n_tasks: int, *args: torch.Tensor) -> list[torch.Tensor]:
    """Apply an element-wise ``fn`` to each task's slices; a leading dim of 1 is shared by all tasks."""
    columns = [a.unbind(0) if a.shape[0] == n_tasks else [a[0]] * n_tasks for a in args]
    return [fn(*slices) for slices in zip(*columns, strict=True)]


def weighted_task_sum(values: Tensors, weight: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t · v_t with ``weight`` ``[T, R, 1]``."""
    return task_sum([v * w for v, w in zip(values, weight.unbind(0), strict=True)])


def task_sum(xs: Tensors) -> torch.Tensor:
    """Σ_t x_t in task order, unrolled over the (static) number of tasks, always into a new tensor: the
    sign consensus below updates it in place, and accumulating in place saves a temporary per task."""
    total = xs[0].clone() if len(xs) == 1 else xs[0] + xs[1]
    for x in xs[2:]:
        total.add_(x)
    return total


def trim(tau: torch.Tensor, threshold: torch.Tensor, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the entries whose magnitude (default |tau|) reaches the threshold (ties kept); zero the rest.

    ``magnitude`` may be any per-entry ranking score, e.g. an entry's position in a sort order
    (``stats.OrderStatistics.order_scores``), whose threshold then selects exactly k entries.
    """
    magnitude = tau.abs() if magnitude is None else magnitude
    return torch.where(magnitude >= threshold, tau, 0.0)


SIGN_CANCEL_RULES = ("entry_majority", "model_majority", "plus_one")

# The consensus below is written in float arithmetic (sign, multiply, add, clamp), in place on its own
# temporaries. On CPU, eager comparisons and ``torch.where`` (bool tensors) cost several float adds per
# entry, and every fresh chunk-sized temporary costs page faults (glibc maps large blocks anew): the two
# were most of a TIES candidate's time. Every formula gives the bits of the comparison form it replaces
# for finite task vectors (argued at each step; tested against it in tests/test_ops_consensus.py).
# In-place updates touch only tensors created here, never the caller's (``tau`` may view the store).


def consensus_trim(tau: torch.Tensor, threshold: torch.Tensor, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """``trim`` for the sign consensus: τ · keep, whose dropped entries may be −0 instead of +0.

    keep = min(sign(m − t) + 1, 1) is 1.0 exactly where m ≥ t: IEEE subtraction of finite floats is 0
    only when they are equal, and t = +inf gives −inf. The −0 is harmless there: the consensus reads a
    value through its sign (±0 vote 0 and never agree) and ``disjoint_merge`` restores +0 where a task
    is masked out.
    """
    keep = tau.abs().sub_(threshold) if magnitude is None else magnitude - threshold
    # an integer score (a sort-order rank) subtracts exactly; its sign is -1/0/1, exact in float
    return keep.sign_().to(tau.dtype).add_(1.0).clamp_(max=1.0).mul_(tau)


def _elect(total: torch.Tensor, signs: Tensors, cancel: str, majority: int) -> torch.Tensor:
    """γ, computed in place in ``total`` (a fresh sum)."""
    total.sign_().mul_(float(len(signs) + 1))
    if cancel == "plus_one":
        total.add_(1.0)
    elif cancel == "model_majority":
        total.add_(float(majority))
    else:
        for s in signs:
            total.add_(s)  # |Σ sign| ≤ T: small integers, exact in any order
    return total.sign_()


def elected_signs(voted: Tensors) -> torch.Tensor:
    """sign(Σ_t v_t), 0 where the sum cancels: what the official code sums to get the model-wide majority."""
    return torch.sign(task_sum(voted))


def sign_agreement(voted: Tensors, cancel: str = "entry_majority", majority: int = 0) -> list[torch.Tensor]:
    """TIES sign election: γ = sign(Σ_t v_t), with a rule for the entries where the sum is exactly 0.

    ``voted`` holds the trimmed task vectors, multiplied by their weights when weights are applied
    before the election. Where Σ_t v_t cancels exactly (frequent with bf16-rounded weights), ``cancel``:

    - ``entry_majority``: the majority of the entry's signs Σ_t sign(v_t), 0 (dropped) where they tie too;
    - ``model_majority``: ``majority``, the model-wide majority of the elected signs (official TIES code,
      ``resolve_zero_signs``), computed by the caller over the whole model;
    - ``plus_one``: +1, as mergekit's ``get_mask`` (``sign_weight >= 0``).

    Returns per task the agreement mask: 1.0 where v·γ > 0, else ±0.0. γ = sign(sign(Σ v)·(T + 1) + fallback):
    where the sum is non-zero its sign outweighs any fallback (|fallback| ≤ T), where it is 0 the fallback
    decides; the mask is max(sign(v)·γ, 0), computing each task's sign once.
    """
    signs = [torch.sign(v) for v in voted]
    gamma = _elect(task_sum(voted), signs, cancel, majority)
    return [s.mul_(gamma).clamp_(min=0.0) for s in signs]


def disjoint_merge(values: Tensors, weights: Tensors, masks: Tensors, how: str) -> torch.Tensor:
    """Combine the agreeing entries: ``sum``, ``mean`` (over agreeing tasks) or ``weighted_mean``.

    ``masks`` are 1.0 (agrees) or ±0.0 per task and entry (``sign_agreement``).

    - ``sum``: Σ_t λ_t τ_t m_t (FusionBench/AdaMerging "dis-sum");
    - ``mean``: Σ_t λ_t τ_t m_t / max(1, Σ_t m_t) (official TIES "dis-mean", λ_t per task);
    - ``weighted_mean``: Σ_t λ_t τ_t m_t / Σ_t λ_t m_t, 0/0 -> 0 (mergekit ``normalize: true``, DELLA).
    """
    count = task_sum(masks)
    num = task_sum([(v * w).mul_(m) for v, w, m in zip(values, weights, masks, strict=True)])
    num.add_(_zero_sign(count, len(masks)))
    if how == "sum":
        return num
    if how == "mean":
        return num.div_(count.clamp_(min=1.0))
    den = task_sum([w * m for w, m in zip(weights, masks, strict=True)])
    return divide_or_zero(num, den)


def divide_or_zero(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den is 0 (the weighted mean's 0/0 -> 0); den never divides where it is 0."""
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)


def unmasked_merge(values: Tensors, weights: Tensors, how: str) -> torch.Tensor:
    """``disjoint_merge`` with every task agreeing everywhere, without building all-ones masks: the same bits.

    With m_t = 1: x·1 = x exactly; the zero added for the sign is −0 (count = T), which changes no value;
    the mean's count is T; Σ_t λ_t·1 per entry is Σ_t λ_t per row, summed in the same order.
    """
    num = task_sum([v * w for v, w in zip(values, weights, strict=True)])
    if how == "sum":
        return num
    if how == "mean":
        return num.div_(float(len(values)))
    den = task_sum(weights)
    return divide_or_zero(num, den)


def _zero_sign(count: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """The zero that gives Σ_t (λ_t τ_t)·m_t the sign of the masked form Σ_t where(m_t, λ_t τ_t, +0).

    A masked-out term is ±0 here, so only a zero sum can differ, in its sign: with a task masked out
    the masked form is +0; with every task agreeing the terms are the same in both forms. Adding +0
    (count < T) or −0 (count = T) gives exactly that: x + 0 = x for x ≠ 0, −0 + +0 = +0, −0 + −0 = −0.
    """
    return count.neg().add_(n_tasks - 0.5).mul_(0.0)
