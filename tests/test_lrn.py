"""The closed-form LRN (split_alexnet/lrn.py) against torch's F.local_response_norm."""
import pytest
import torch
import torch.nn.functional as F

from split_alexnet.lrn import LRNFunction, local_response_norm
from split_alexnet.spec import LRN


def _both(x, g, fn, **kw):
    x = x.detach().requires_grad_()
    y = fn(x, **kw)
    (dx,) = torch.autograd.grad(y, x, g)
    return y.detach(), dx


@pytest.mark.parametrize("shape,size", [
    ((2, 7, 3, 4), 5),        # more channels than the window
    ((2, 2, 3, 3), 5),        # fewer channels than the window: every window is clipped
    ((1, 1, 2, 2), 5),
    ((2, 6, 3, 3), 4),        # even window: torch pads size//2 in front, (size-1)//2 behind
    ((2, 5, 2, 2), 2),
    ((2, 5, 2, 2), 1),
    ((2, 6, 5), 3),           # (N, C, L)
    ((1, 4, 2, 2, 2), 3),     # (N, C, D, H, W)
])
@pytest.mark.parametrize("beta", [0.75, 0.6])
def test_gradcheck_float64(shape, size, beta):
    torch.manual_seed(0)
    # alpha large enough that the normalisation's own derivative term matters at these scales
    x = (torch.randn(shape, dtype=torch.float64) * 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: local_response_norm(t, size, 0.5, beta, 2.0), (x,))


def test_gradcheck_through_the_groups_reshape():
    # as model.py applies it: (B, G*C, H, W) viewed as (B*G, C, H, W), so windows stay within a group
    torch.manual_seed(1)
    x = (torch.randn(2, 6, 3, 3, dtype=torch.float64) * 3).requires_grad_()

    def grouped(t, groups=2):
        b, c, h, w = t.shape
        return local_response_norm(t.reshape(b * groups, c // groups, h, w), 5, 0.5, 0.75, 2.0).reshape(b, c, h, w)

    assert torch.autograd.gradcheck(grouped, (x,))
    g = torch.randn_like(x)
    y, dx = _both(x, g, grouped)
    def ref(t):
        return torch.cat([F.local_response_norm(p, 5, 0.5, 0.75, 2.0) for p in t.split(3, 1)], 1)
    y_ref, dx_ref = _both(x, g, ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("size,channels", [(5, 48), (5, 3), (4, 9), (3, 8)])
def test_float64_equals_torch(size, channels):
    torch.manual_seed(2)
    x = torch.relu(torch.randn(3, channels, 6, 6, dtype=torch.float64) * 40 + 10)
    g = torch.randn_like(x)
    kw = dict(size=size, alpha=1e-2, beta=0.75, k=2.0)
    y, dx = _both(x, g, local_response_norm, **kw)
    y_ref, dx_ref = _both(x, g, F.local_response_norm, **kw)
    assert ((y - y_ref).abs() / y_ref.abs().clamp_min(1e-300)).max() < 1e-13
    assert (dx - dx_ref).abs().max() < 1e-12 * dx_ref.abs().max()


def _bounds(x, g, size, alpha, beta, k):
    """|y| and the sum of the absolute values of dL/dx's terms, in float64 (the error's scale)."""
    x, g = x.double(), g.double()
    sq = F.pad((x * x).unsqueeze(1), (0, 0, 0, 0, size // 2, (size - 1) // 2)).squeeze(1)
    s = k + alpha / size * sum(sq[:, d:d + x.shape[1]] for d in range(size))
    p = s ** -beta
    t = (g * x * p / s).abs()
    tp = F.pad(t.unsqueeze(1), (0, 0, 0, 0, (size - 1) // 2, size // 2)).squeeze(1)
    window_t = sum(tp[:, d:d + x.shape[1]] for d in range(size))
    return (x * p).abs(), (g * p).abs() + 2 * alpha * beta / size * x.abs() * window_t


@pytest.mark.parametrize("scale", [1.0, 30.0, 300.0])
def test_float32_equals_torch_to_round_off(scale):
    """Forward and backward within a stated round-off bound of torch's, elementwise.

    Error model (u = 2^-24, fp32's unit round-off): s sums `size` non-negative terms (squares, k/size
    each), so its relative error is at most about (size + 2) u with no cancellation; s^-beta adds
    beta times that plus a few u for rsqrt/sqrt or pow; y one more: about 10 u at size 5, elementwise
    relative. dL/dx = g p - c x W(g x p / s) subtracts two terms, so its error is relative to the sum
    of their absolute values B (computed in float64): every factor of the second term carries ~10 u,
    the window's sum adds (size - 1) u relative to the sum of |terms|, about 25 u in all. Both our
    result and torch's carry such an error; we allow 32 u against float64 truth and 64 u between the
    two. Measured maxima (this seed): 5.4 u against truth (torch's own: 5.6 u), 8.4 u between the two.
    `scale` sets how far the normalisation moves s away from k.
    """
    torch.manual_seed(3)
    u = 2.0 ** -24
    x = torch.relu(torch.randn(4, 48, 13, 13) * scale + scale / 4)
    g = torch.randn_like(x)
    y, dx = _both(x, g, local_response_norm, **LRN)
    y_ref, dx_ref = _both(x, g, F.local_response_norm, **LRN)
    y64, dx64 = _both(x.double(), g.double(), F.local_response_norm, **LRN)
    by, bdx = _bounds(x, g, **LRN)
    assert ((y.double() - y64).abs() <= 32 * u * by).all()
    assert ((dx.double() - dx64).abs() <= 32 * u * bdx).all()
    assert ((y - y_ref).double().abs() <= 64 * u * by).all()
    assert ((dx - dx_ref).double().abs() <= 64 * u * bdx).all()
    # the model holds for torch's own result too (else the bound, not our code, would be wrong)
    assert ((dx_ref.double() - dx64).abs() <= 32 * u * bdx).all()


def test_inputs_untouched_and_empty_and_noncontiguous():
    torch.manual_seed(4)
    x = torch.randn(2, 8, 5, 5)
    keep = x.clone()
    y, dx = _both(x, torch.ones_like(x), local_response_norm, **LRN)
    assert torch.equal(x, keep)
    cl = x.to(memory_format=torch.channels_last)
    y2, dx2 = _both(cl, torch.ones_like(x), local_response_norm, **LRN)
    torch.testing.assert_close(y2, y), torch.testing.assert_close(dx2, dx)
    empty = torch.empty(0, 8, 5, 5)
    assert local_response_norm(empty, **LRN).shape == empty.shape
    with pytest.raises(ValueError):
        local_response_norm(torch.randn(3, 4), **LRN)


def test_double_backward_is_refused():
    x = torch.randn(1, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad(local_response_norm(x, **LRN).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        dx.sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_cuda_matches_cpu():
    torch.manual_seed(5)
    x = torch.relu(torch.randn(4, 48, 13, 13, dtype=torch.float64) * 30)
    g = torch.randn_like(x)
    y, dx = _both(x, g, local_response_norm, **LRN)
    yc, dxc = _both(x.cuda(), g.cuda(), local_response_norm, **LRN)
    torch.testing.assert_close(yc.cpu(), y, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dxc.cpu(), dx, rtol=1e-12, atol=1e-14)
    xf = x.float().cuda()
    y32, _ = _both(xf, g.float().cuda(), local_response_norm, **LRN)
    torch.testing.assert_close(y32, F.local_response_norm(xf, **LRN), rtol=1e-5, atol=1e-6)


# ---- fast on GPUs: no host copy per call, one dynamo graph, the traced path (issue 15) ---------------

class _Calls(torch.overrides.TorchFunctionMode):
    """The torch functions called inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_no_tensor_is_copied_from_the_host_per_call():
    """torch.tensor(k/size, device=x.device) was a synchronising host-to-device copy on CUDA per call."""
    x = torch.rand(2, 8, 5, 5, requires_grad=True)
    with _Calls() as calls:
        LRNFunction.apply(x, 5, 1e-4, 0.75, 2.0).sum().backward()
    assert "tensor" not in calls.names and "full" in calls.names


def _lrn_relu_pool(x):
    return F.max_pool2d(local_response_norm(F.relu(x), **LRN), 3, 2)


@pytest.mark.slow
def test_lrn_is_one_dynamo_graph():
    explained = torch._dynamo.explain(_lrn_relu_pool)(torch.randn(2, 12, 9, 9, requires_grad=True))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("shape,size", [((2, 7, 3, 4), 5), ((2, 6, 3, 3), 4), ((1, 4, 2, 2, 2), 3)])
@pytest.mark.slow
def test_traced_path_equals_eager_float64(shape, size):
    """Under torch.compile the Function takes its traced branch (F.pad, only x saved, s and s^-beta
    recomputed in the backward): the same formula in another order, so float64 round-off apart."""
    torch.manual_seed(6)
    x = torch.relu(torch.randn(shape, dtype=torch.float64) * 30)
    g = torch.randn_like(x)
    kw = dict(size=size, alpha=1e-2, beta=0.75, k=2.0)
    y, dx = _both(x, g, local_response_norm, **kw)
    torch._dynamo.reset()
    yc, dxc = _both(x, g, torch.compile(local_response_norm, backend="aot_eager", fullgraph=True), **kw)
    torch.testing.assert_close(yc, y, rtol=1e-13, atol=0)
    torch.testing.assert_close(dxc, dx, rtol=1e-12, atol=1e-14 * dx.abs().max().item())


@pytest.mark.slow
def test_traced_path_keeps_the_half_dtype():
    torch.manual_seed(7)
    x = (torch.rand(2, 12, 5, 5) * 40).bfloat16().requires_grad_()
    torch._dynamo.reset()
    y = torch.compile(local_response_norm, backend="aot_eager", fullgraph=True)(x, **LRN)
    ref = local_response_norm(x.detach().float(), **LRN)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).abs() <= 2.0**-8 * ref.abs()).all()   # fp32 inside: one final rounding
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
