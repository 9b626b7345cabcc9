"""Exact modular dot products of integer rows, through float64 matrix products.

The query cache (:mod:`clbench.query_cache`) fingerprints an image by two sums
``(sum_i x_i * w_i) mod p`` over its raw 32-bit words. Done elementwise in int64 (a
remainder per element and weight) that costs about a tenth of a ViT-Ti forward pass per
224-px image on a CPU, paid at every training and evaluation batch. The same sums come
out of float64 matrix products: with 16-bit halves ``x = x_hi 2^16 + x_lo`` and
``w = w_hi 2^16 + w_lo`` every product is below 2^32 in magnitude, so a float64 sum of
up to 2^20 of them (below 2^52) is an exact integer whatever the order of summation;
the four partial sums are then combined modulo p in int64. The results are the very
values of the elementwise formula (tests/test_modular_hash.py checks it on random and
extreme inputs), about four times faster.
"""

from __future__ import annotations

import torch
from torch import Tensor

_LOW = 0xFFFF
# float64 partial sums of |terms| < 2^32 stay exact integers below 2^52 for 2^20 terms
_CHUNK = 1 << 20


def modular_dot(values: Tensor, weights: Tensor, prime: int) -> tuple[Tensor, Tensor]:
    """``(sum_i values[b, i] * weights[k, i]) mod prime`` for k = 0 and 1, exactly.

    values: [B, N] integers that fit in int32 (int32, uint8, ...); weights: int64 [2, N]
    in ``[0, 2^31)``; prime below 2^31. Returns two int64 [B] tensors in ``[0, prime)``.
    """
    words = values.to(torch.int32)
    halves = torch.cat([weights >> 16, weights & _LOW])  # [4, N]: w0_hi, w1_hi, w0_lo, w1_lo
    high = torch.zeros(words.shape[0], 4, dtype=torch.long, device=words.device)
    low = torch.zeros_like(high)
    for start in range(0, words.shape[1], _CHUNK):
        part = words[:, start : start + _CHUNK]
        w = halves[:, start : start + _CHUNK].to(torch.float64).T
        high += ((part >> 16).to(torch.float64) @ w).long()  # x_hi in [-2^15, 2^15)
        low += ((part & _LOW).to(torch.float64) @ w).long()  # x_lo in [0, 2^16)
    shift_32 = (1 << 32) % prime
    sums = []
    for k in (0, 1):
        hh, hl = high[:, k], high[:, 2 + k]
        lh, ll = low[:, k], low[:, 2 + k]
        total = (
            torch.remainder(hh, prime) * shift_32
            + torch.remainder(hl + lh, prime) * (1 << 16)
            + torch.remainder(ll, prime)
        )
        sums.append(torch.remainder(total, prime))
    return sums[0], sums[1]
