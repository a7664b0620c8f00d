"""Local response normalisation across channels, with a closed-form backward.

Same definition as `torch.nn.functional.local_response_norm`, which divides alpha by n:

    s[c] = k + (alpha / n) * sum_{j in W(c)} x[j]^2,    y[c] = x[c] * s[c]^-beta,

W(c) = [c - n//2, c + (n-1)//2], channels outside [0, C) count as zero (torch pads n//2 in front and
(n-1)//2 behind, then averages n values: zeros included). Backward, with g = dL/dy:

    dL/dx[j] = g[j] s[j]^-beta - (2 alpha beta / n) x[j] * sum_{c : j in W(c)} g[c] x[c] s[c]^(-beta-1)

and j in W(c) <=> c in [j - (n-1)//2, j + n//2]: the transposed window, the same window when n is odd.

The paper's LRN (§3.3) writes k + alpha * sum x^2, with k=2, n=5, alpha=1e-4, beta=0.75, and no division
by n. cuda-convnet2 divides its scale by n (layer.py:1331: `dic['scale'] /= dic['size']`), so with
alpha=1e-4 (spec.LRN) this function uses the constants cuda-convnet2 ran (which places conv1's LRN before
the ReLU: docs/reproduction.md); the paper's formula read literally would be alpha=5e-4 here.

`F.local_response_norm` builds this from avg_pool3d, pow, mul and div, and autograd differentiates
each, saving their inputs. `LRNFunction` saves x (the ReLU's output, which autograd holds anyway), s
and s^-beta, and computes the windowed sums as sums of shifted slices of one channel-padded buffer, by
doubling (n = 5: 3 adds, not 4); k/n is added to every entry of the padded buffer of squares, pads
included, so the window's sum is s itself. beta = 0.75 (AlexNet's) takes s^-0.75 = rsqrt(s) * sqrt(rsqrt(s)),
about 3x cheaper than pow on CPU. Every op is an ordinary tensor op: it runs on any device.

Half precision (bf16/fp16 inputs, e.g. under torch.autocast): s, s^-beta and the backward's windowed
sums are computed in fp32 from the half input (a window of 5 squares summed in bf16 would lose up to
2^-8 of s per add, and fp16's x^2 overflows beyond |x| = 256), and y and dL/dx are returned in the
input's dtype, so the activations after LRN (and the split's conv3 exchange) stay 2-byte tensors.
What is saved for backward: x in its own dtype, s and s^-beta in fp32.

No host synchronisation: k/size reaches the fused multiply-add as a 0-dim tensor made on x's device by
a fill (`torch.full`), not copied from the host (`torch.tensor(..., device=...)` is a synchronising
host-to-device copy on CUDA).

Under torch.compile (dynamo) the same Function is traced, forward and closed-form backward, into the
caller's graph: the padded buffers are built with `F.pad` instead of `out=` into a view (which breaks a
dynamo graph), and only x is saved, s and s^-beta being recomputed in the backward. Inductor fuses each
direction into one kernel with the ReLU before and the max-pool after it (conv1/conv2); it reads and
writes the step's dtype (bf16: x, y, dL/dy and dL/dx are 2-byte tensors in memory), and the fp32 that
the window sums need (s, s^-beta, the backward's windowed sum) lives in registers, not in memory.
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import handle_torch_function, has_torch_function_unary

__all__ = ["LRNFunction", "local_response_norm"]

_HALF = (torch.float16, torch.bfloat16)


def _window_sum(padded, size, channels):
    """out[:, c] = sum_{d < size} padded[:, c + d] for c < channels; padded has channels + size - 1."""
    acc, off, w, span, rem = None, 0, padded, 1, size
    while True:                       # w[:, j] = sum of `span` consecutive channels from j
        if rem & 1:
            term = w[:, off:off + channels]
            acc = term if acc is None else torch.add(acc, term)
            off += span
        rem >>= 1
        if not rem:
            break
        w = torch.add(w[:, :-span], w[:, span:])
        span *= 2
    return acc


def _padded(x, front, back, fill=0.0):
    """An uninitialised (N, front + C + back, ...) buffer, its pads set to fill, and its middle view."""
    n, c = x.shape[:2]
    buf = torch.empty((n, front + c + back) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    buf[:, :front].fill_(fill)
    buf[:, front + c:].fill_(fill)
    return buf, buf[:, front:front + c]


def _pad_channels(t, front, back, fill=0.0):
    """t padded along dim 1 (the traced path: one op that Inductor fuses, no out= into a view)."""
    return F.pad(t, (0, 0) * (t.dim() - 2) + (front, back), value=fill)


def _norm(xc, size, alpha, beta, k, traced):
    """s = k + alpha/size * window sum of xc^2, and s^-beta (xc in fp32 for half inputs)."""
    channels, lo, hi = xc.shape[1], size // 2, (size - 1) // 2
    # every padded channel holds k/size + alpha/size * x^2 (pads: k/size), so that the window's
    # sum of `size` entries is s itself: k folded in, no separate scale and shift passes. The 0-dim
    # k/size is made on x's device by a fill: CUDA's addcmul refuses a CPU scalar tensor as self (H100
    # run), and torch.tensor(..., device=cuda) would be a synchronising host-to-device copy.
    k_over_n = torch.full((), k / size, dtype=xc.dtype, device=xc.device)
    if traced:
        sq = _pad_channels(torch.addcmul(k_over_n, xc, xc, value=alpha / size), lo, hi, fill=k / size)
    else:                                         # eager: written straight into the padded buffer
        sq, mid = _padded(xc, lo, hi, fill=k / size)
        torch.addcmul(k_over_n, xc, xc, value=alpha / size, out=mid)
        del mid
    s = _window_sum(sq, size, channels)
    return s, _neg_pow(s, beta)


def _neg_pow(s, beta):
    """s ** -beta; rsqrt and sqrt instead of pow for the common betas."""
    if beta == 0.75:
        p = torch.rsqrt(s)
        return p.mul_(torch.sqrt(p))
    if beta == 0.5:
        return torch.rsqrt(s)
    if beta == 1.0:
        return torch.reciprocal(s)
    return torch.pow(s, -beta)


class LRNFunction(torch.autograd.Function):
    """y = x * (k + alpha/size * windowed sum of x^2 over channels)^-beta, for (N, C, *) inputs."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        traced = torch.compiler.is_compiling()       # under dynamo: functional ops (module docstring)
        if not traced:
            x = x.contiguous()
        xc = x.float() if x.dtype in _HALF else x      # computed in fp32 for half inputs (docstring)
        s, p = _norm(xc, size, alpha, beta, k, traced)
        ctx.lrn = (size, alpha, beta, k)
        if traced:                                     # s, p recomputed in the backward's fused kernel
            ctx.save_for_backward(x)
            return (xc * p).to(x.dtype)
        ctx.save_for_backward(x, s, p)
        if xc is x:
            return xc * p
        return torch.mul(xc, p, out=torch.empty_like(x))  # fp32 product, written once in x's dtype

    @staticmethod
    @once_differentiable                              # s, p were saved without history
    def backward(ctx, g):
        saved = ctx.saved_tensors
        traced = len(saved) == 1
        x = saved[0]
        out_dtype = x.dtype
        if x.dtype in _HALF:                           # a half input: fp32 here, its dtype out
            x, g = x.float(), g.float()
        size, alpha, beta, k = ctx.lrn
        s, p = _norm(x, size, alpha, beta, k, True) if traced else saved[1:]
        channels, lo, hi = x.shape[1], size // 2, (size - 1) // 2
        gp = g * p                                     # g s^-beta, becomes dL/dx below
        c = -2.0 * alpha * beta / size
        if traced:                                     # the transposed window's padding
            u = _window_sum(_pad_channels(gp * x / s, hi, lo), size, channels)
            return (gp + c * x * u).to(out_dtype), None, None, None, None
        t, mid = _padded(x, hi, lo)
        torch.mul(gp, x, out=mid)
        mid.div_(s)                                    # g x s^(-beta-1)
        u = _window_sum(t, size, channels)
        del t, mid
        if out_dtype == x.dtype:
            return gp.addcmul_(x, u, value=c), None, None, None, None
        return torch.addcmul(gp, x, u, value=c, out=torch.empty_like(x, dtype=out_dtype)), None, None, None, None


def local_response_norm(x, size, alpha=1e-4, beta=0.75, k=1.0):
    """Drop-in for `F.local_response_norm` on (N, C, *) inputs (same defaults), closed-form backward."""
    if has_torch_function_unary(x):  # like torch.nn.functional: visible to TorchFunctionModes (the trace)
        return handle_torch_function(local_response_norm, (x,), x, size, alpha=alpha, beta=beta, k=k)
    if x.dim() < 3:
        raise ValueError(f"local_response_norm expects (N, C, *) with at least 3 dims, got {x.dim()}")
    if x.numel() == 0:
        return x
    return LRNFunction.apply(x, size, float(alpha), float(beta), float(k))
