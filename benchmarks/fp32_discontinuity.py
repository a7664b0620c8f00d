"""Why the check rules on derivatives in float64: fp32 gradients of two layouts part at discontinuities.

    python benchmarks/fp32_discontinuity.py [--batch-size 4] [--steps 3]

Trains the single layout in float64 and in fp32 and the streams layout in fp32 from the same weights and
batch (train mode, SGD with momentum), and prints per step: the loss, how far each fp32 gradient is from
float64 (relative to the tensor's largest entry), and how many max-pool argmaxes and ReLU signs differ
between the two fp32 layouts. A differing argmax moves one activation's whole gradient.
"""
import argparse

import torch
import torch.nn.functional as F

from split_alexnet import model as M
from split_alexnet.model import AlexNet, join_state_dicts, streams_from_single
from split_alexnet.spec import Spec

TENSORS = ("conv1.weight", "conv1.bias", "conv4.bias", "fc6.weight")


def trajectory(spec, state, x, y, dtype, layout, steps):
    ref = AlexNet(spec=spec).to(dtype)
    ref.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    net = ref if layout == "single" else streams_from_single(ref)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    record, pools = [], []
    real_pool = F.max_pool2d

    def pool(t, **kw):  # the argmax of every window, in the single layout's channel order
        out, idx = real_pool(t, return_indices=True, **kw)
        pools.append(idx)
        return out
    M.F.max_pool2d = pool
    try:
        for _ in range(steps):
            pools.clear()
            loss = F.cross_entropy(net(x.to(dtype)), y)
            opt.zero_grad()
            loss.backward()
            if layout == "single":
                grads = {n: p.grad.double() for n, p in net.named_parameters()}
                idx = list(pools)
            else:
                parts = [{n: p.grad for n, p in s.named_parameters()} for s in net.streams]
                grads = {k: v.double() for k, v in join_state_dicts(parts, spec).items()}
                s = spec.streams
                idx = [torch.cat(pools[i * s:(i + 1) * s], 1) for i in range(len(pools) // s)]
            record.append((loss.item(), grads, idx))
            opt.step()
    finally:
        M.F.max_pool2d = real_pool
    return record


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    spec = Spec(streams=2)
    torch.manual_seed(0)
    state = AlexNet(spec=spec, init="d2l").state_dict()  # the check's weights and batch
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, 3, 227, 227, generator=gen)
    y = torch.randint(0, 1000, (args.batch_size,), generator=gen)
    s64 = trajectory(spec, state, x, y, torch.float64, "single", args.steps)
    s32 = trajectory(spec, state, x, y, torch.float32, "single", args.steps)
    t32 = trajectory(spec, state, x, y, torch.float32, "streams", args.steps)
    for k in range(args.steps):
        flips = [int((a != b).sum()) for a, b in zip(s32[k][2], t32[k][2])]
        print(f"step {k}: loss single64 {s64[k][0]:.9f} single32 {s32[k][0]:.9f} streams32 {t32[k][0]:.9f}; "
              f"max-pool argmaxes that differ (pool1, pool2, pool5): {flips}")
        for n in TENSORS:
            g64, g32, t = s64[k][1][n], s32[k][1][n], t32[k][1][n]
            scale = g64.abs().max().item()
            print(f"  {n:13s} |single32 - single64| {(g32 - g64).abs().max().item() / scale:.1e}   "
                  f"|streams32 - single64| {(t - g64).abs().max().item() / scale:.1e}   (of max |grad| {scale:.2e})")


if __name__ == "__main__":
    main()
