"""The counter-based dropout masks (split_alexnet/model.py, keep_mask): an exact integer function of
(seed, draw, row, column), so the same on every device, dtype and backend, for any cut of the batch, and
Bernoulli(keep) in distribution. The layouts' agreement in train mode: tests/test_check.py, test_layouts.py,
test_mesh.py; states in checkpoints: tests/test_recipe.py."""
import math

import pytest
import torch

from split_alexnet.model import DropoutMasks, keep_mask

M32 = 2**32 - 1


def _lowbias32(x):
    """The reference: lowbias32 on Python ints, with plain multiplication mod 2^32 (not the model's
    16-bit split), so an int64 overflow or a wrong split in the tensor code shows."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _reference(seed, draw, i, j, width, keep):
    k1 = _lowbias32(_lowbias32(_lowbias32((draw & M32) ^ (seed & M32)) ^ ((draw >> 32) & M32)) ^ ((seed >> 32) & M32))
    k2 = _lowbias32(k1 ^ 0x9E3779B9)
    return _lowbias32(_lowbias32((i * width + j) ^ k1) ^ k2) < round(keep * 2**32)


@pytest.mark.parametrize("seed, draw", [(0, 0), (7, 3), (-1, 2**33 + 5), (2**40 + 9, 11)])
def test_mask_is_the_integer_hash(seed, draw):
    rows, cols, width = (1000, 6), (2040, 16), 4096          # stream 1's first columns of fc6, rows 1000..
    got = keep_mask(seed, torch.tensor(draw), rows, cols, width, 0.5)
    want = torch.tensor([[_reference(seed, draw, i, j, width, 0.5) for j in range(cols[0], cols[0] + cols[1])]
                         for i in range(rows[0], rows[0] + rows[1])])
    assert torch.equal(got, want)
    assert torch.equal(keep_mask(seed, draw, rows, cols, width, 0.5), want)   # a Python int counter too


def test_any_slice_is_the_full_masks_slice_in_any_dtype():
    """Every stream's columns, every replica's or micro-batch's rows: the full-width, full-batch mask cut."""
    full = keep_mask(3, torch.tensor(5), (0, 16), (0, 4096), 4096, 0.5)
    for rows, cols in [((0, 8), (0, 2048)), ((8, 8), (2048, 2048)), ((4, 3), (1000, 1024)), ((15, 1), (4095, 1))]:
        part = keep_mask(3, torch.tensor(5), rows, cols, 4096, 0.5)
        assert torch.equal(part, full[rows[0]:rows[0] + rows[1], cols[0]:cols[0] + cols[1]])
    masks = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        m = DropoutMasks(3)
        m.draws.fill_(5)
        y = m(torch.ones(16, 2048, dtype=dtype), 0.5, 4096, 2048)
        assert y.dtype == dtype and set(y.unique().tolist()) == {0.0, 2.0}   # 0 or 1/keep, one multiply
        masks[dtype] = y.double()
        assert int(m.draws) == 6
    assert all(torch.equal(v, masks[torch.float64]) for v in masks.values())
    assert torch.equal(masks[torch.float64] > 0, full[:, 2048:])


def test_micro_batch_rows_advance_the_counter_once():
    whole, parts = DropoutMasks(1), DropoutMasks(1)
    x = torch.randn(8, 64)
    ref = whole(x, 0.5, 64, 0)
    got = torch.cat([parts(x[:4], 0.5, 64, 0, row=0, last=False), parts(x[4:], 0.5, 64, 0, row=4, last=True)])
    assert torch.equal(got, ref) and int(parts.draws) == int(whole.draws) == 1
    assert not torch.equal(whole(x, 0.5, 64, 0), ref)          # the next draw is another mask


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.1])
def test_keep_probability_within_the_binomial_bound(keep):
    """Over N = 64 x 4096 entries the kept count is Binomial(N, keep): within 5 standard deviations
    (a chance of 6e-7 of failing a correct generator; the hash is fixed, so this never flakes)."""
    n, sd = 64 * 4096, lambda q, m: 5 * math.sqrt(m * q * (1 - q))
    for draw in range(2):
        kept = keep_mask(0, torch.tensor(draw), (0, 64), (0, 4096), 4096, keep)
        assert abs(kept.sum().item() - n * keep) <= sd(keep, n)
        # two draws, neighbouring columns, neighbouring rows: independent, each pair agrees with
        # probability keep^2 + (1 - keep)^2
        q = keep**2 + (1 - keep)**2
        other = keep_mask(0, torch.tensor(draw + 1), (0, 64), (0, 4096), 4096, keep)
        for a, b in [(kept, other), (kept[:, 1:], kept[:, :-1]), (kept[1:], kept[:-1])]:
            m = a.numel()
            assert abs((a == b).sum().item() - m * q) <= sd(q, m)


def test_too_large_a_mask_is_refused():
    with pytest.raises(ValueError, match="at most 2\\^32"):
        keep_mask(0, 0, (2**20, 1), (0, 4096), 4096, 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_cuda_masks_equal_cpu():
    """The point of the counter: a GPU (of any model) draws the CPU's masks, so a run resumes anywhere."""
    cpu = keep_mask(9, torch.tensor(4), (64, 128), (0, 4096), 4096, 0.5)
    gpu = keep_mask(9, torch.tensor(4, device="cuda"), (64, 128), (0, 4096), 4096, 0.5, device="cuda")
    assert torch.equal(gpu.cpu(), cpu)
    m = DropoutMasks(9).cuda()
    m.draws.fill_(4)
    y = m(torch.ones(128, 4096, device="cuda", dtype=torch.bfloat16), 0.5, 4096, 0, row=64)
    assert torch.equal((y > 0).cpu(), cpu)
