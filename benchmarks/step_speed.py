"""One training step of the single layout before/after the closed-form LRN, and torchvision's AlexNet.

  PYTHONPATH=. python benchmarks/step_speed.py                         # interleaved timing, 1 thread
  PYTHONPATH=. python benchmarks/step_speed.py --keep-freed-memory     # the same after keep_freed_memory()
  PYTHONPATH=. python benchmarks/step_speed.py --profile --rounds 1    # + torch.profiler table per variant

A step: forward, cross-entropy, backward, SGD (lr 0.01, momentum 0.9, weight decay 5e-4), zero_grad,
on a fixed random batch. Variants (--variants, comma-separated):
  single-torchlrn  AlexNet(lrn_fn=F.local_response_norm), 227 px: torch's LRN (the model's before lrn.py)
  single           AlexNet(), 227 px, split_alexnet.lrn
  single-inplace   the same with ReLU in place (layer_fn patched here; model.py has since made ReLU in place)
  single-cl        the same in channels_last
  torchvision      torchvision.models.alexnet(), 224 px
Rounds alternate the order (A B C, C B A, ...); round 0 is warm-up; medians over the rest. The LRN is
wrapped (here, not in model.py) so its forward and backward time are measured: forward inside
record_function("lrn"), backward between two identity autograd nodes placed around it ("lrn_backward").
"""
import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from split_alexnet import AlexNet
from split_alexnet.allocator import keep_freed_memory
from split_alexnet.lrn import local_response_norm as fast_lrn

LRN_TIME = {"fwd": 0.0, "bwd": 0.0}
_open = []


class _Enter(torch.autograd.Function):      # on the LRN's output: its backward runs first
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _open.append((time.perf_counter(), torch.ops.profiler._record_function_enter_new("lrn_backward", None)))
        return g


class _Exit(torch.autograd.Function):       # on the LRN's input: its backward runs last
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        t0, handle = _open.pop()
        torch.ops.profiler._record_function_exit._RecordFunction(handle)
        LRN_TIME["bwd"] += time.perf_counter() - t0
        return g


def labelled(impl):
    def lrn(x, **kw):
        t0 = time.perf_counter()
        with torch.profiler.record_function("lrn"):
            y = _Enter.apply(impl(_Exit.apply(x), **kw))
        LRN_TIME["fwd"] += time.perf_counter() - t0
        return y
    return lrn


def inplace_layer_fn(self, layer, x):
    """_Layers.layer_fn with F.relu(x, inplace=True) (the conv's output is not saved for backward)."""
    from split_alexnet.spec import LRN, POOL
    if layer.kind == "fc":
        x = x.flatten(1)
    x = getattr(self, layer.name)(x)
    if layer.relu:
        x = F.relu(x, inplace=True)
    if layer.lrn:
        groups = self.spec.streams if self.stream is None else 1
        b, c, h, w = x.shape
        x = self.lrn_fn(x.reshape(b * groups, c // groups, h, w), **LRN).reshape(b, c, h, w)
    if layer.pool:
        x = F.max_pool2d(x, **POOL)
    if layer.dropout and self.training:
        x = self.dropout(x, layer.dropout, self.spec.width(layer), self.offset(layer))
    return x


def build(name, batch):
    torch.manual_seed(0)
    if name == "torchvision":
        import torchvision
        net, size, lrn = torchvision.models.alexnet(num_classes=1000), 224, None
    else:
        lrn = F.local_response_norm if name == "single-torchlrn" else fast_lrn
        net, size = AlexNet(lrn_fn=labelled(lrn)), 227   # the LRN is the model's argument
        if name == "single-inplace":
            net.layer_fn = inplace_layer_fn.__get__(net)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    if name.endswith("-cl"):
        net, x = net.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return dict(net=net.train(), x=x, y=y, opt=opt)


def step(v):
    loss = F.cross_entropy(v["net"](v["x"]), v["y"])
    loss.backward()
    v["opt"].step()
    v["opt"].zero_grad(set_to_none=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="single-torchlrn,single,torchvision")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep-freed-memory", action="store_true")
    p.add_argument("--profile", action="store_true", help="after timing, profile one step per variant")
    args = p.parse_args()
    if args.keep_freed_memory:
        print("allocator:", keep_freed_memory()[1])
    torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    vs = {n: build(n, args.batch_size) for n in names}
    rec = {n: dict(t=[], flt=[], lrn=[]) for n in names}
    for r in range(args.rounds + 1):
        for n in (names if r % 2 == 0 else names[::-1]):
            LRN_TIME.update(fwd=0.0, bwd=0.0)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            step(vs[n])
            dt = time.perf_counter() - t0
            if r:
                rec[n]["t"].append(dt)
                rec[n]["flt"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                rec[n]["lrn"].append(LRN_TIME["fwd"] + LRN_TIME["bwd"])
    print(f"batch {args.batch_size}, {args.threads} thread(s), {args.rounds} rounds, medians")
    print(f"{'variant':<17} {'img/s':>7} {'min-max':>13} {'step s':>7} {'LRN s':>6} {'LRN %':>6} {'faults/step':>12}")
    for n in names:
        t, med = rec[n]["t"], statistics.median(rec[n]["t"])
        lrn = statistics.median(rec[n]["lrn"])
        print(f"{n:<17} {args.batch_size / med:7.2f} {args.batch_size / max(t):6.2f}-{args.batch_size / min(t):<6.2f} "
              f"{med:7.3f} {lrn:6.3f} {100 * lrn / med:5.1f}% {statistics.median(rec[n]['flt']):12.0f}")
    if args.profile:
        for n in names:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                with torch.profiler.record_function("step"):
                    step(vs[n])
            ka = prof.key_averages()
            total = next(e.cpu_time_total for e in ka if e.key == "step")
            lrn = sum(e.cpu_time_total for e in ka if e.key in ("lrn", "lrn_backward"))
            print(f"\n== {n}: step {total / 1e6:.3f} s, lrn + lrn_backward {lrn / 1e6:.3f} s = "
                  f"{100 * lrn / total:.1f}% (profiled step)")
            print(ka.table(sort_by="cpu_time_total", row_limit=22, max_name_column_width=48))


if __name__ == "__main__":
    main()
