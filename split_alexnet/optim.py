"""The paper's update rule and cuda-convnet2's learning-rate schedule.

PaperSGD: the update of the paper (§5), of cuda-convnet2 (cudaconvnet/src/weights.cu,
Weights::aggregateReplicaGradients: inc = mom * inc + eps * grad - wc * eps * w, then w += inc; its
"grad" is the negative gradient) and of Caffe (src/caffe/solvers/sgd_solver.cpp, ComputeUpdateValue:
history = momentum * history + local_rate * (grad + decay * w), w -= history):

    v <- momentum * v - weight_decay * lr * w - lr * dL/dw;     w <- w + v

The learning rate is inside the velocity. torch.optim.SGD keeps the velocity in gradient units and
multiplies by the lr at the step (buf <- momentum * buf + g + wd * w; w <- w - lr * buf). With a
constant lr the two are the same sequence of weights (v = -lr * buf); after an lr change they part:
the paper's form keeps moving with the velocity it built at the old rate (its weight 0.9^k fades over
some tens of steps), torch's rescales that velocity at once. The weights stay apart after that.

DexpSchedule: cuda-convnet2's `dexp[base;tgtFactor;numSteps]` (cudaconvnet/src/lr.cu,
DiscreteExpParameterSchedule): numSteps rates, base * (1/tgtFactor)^(i / (numSteps - 1)) for
i < numSteps - 1 and base / tgtFactor last, the i-th used while the training progress p satisfies
p <= (i + 1) / numSteps; p = (batches done before this one) / (all batches of the run)
(python_util/gpumodel.py, get_progress; cuda-convnet2 computes it once per data-batch file of many
minibatches, here once per SGD step). Its two-GPU file (layers/layer-params-imagenet-2gpu-model.cfg)
gives every layer epsW=dexp[base=0.02;tgtFactor=250;numSteps=4], epsB=dexp[base=0.04;tgtFactor=25;numSteps=2].
"""
import torch

from .errors import UsageError


class PaperSGD(torch.optim.Optimizer):
    """SGD with the learning rate inside the velocity (the paper's §5, cuda-convnet2's and Caffe's form).

    PaperSGD(params, lr, momentum=0.9, weight_decay=5e-4): parameter groups may set their own "lr" and
    "weight_decay" (and "momentum"), as with torch.optim.SGD. The velocity of each parameter is its
    state "momentum_buffer" (in the parameters' units, not the gradients'), saved and loaded through
    state_dict() like every torch optimizer's state."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=5e-4):
        if not lr > 0:
            raise ValueError(f"PaperSGD: lr {lr}: use a positive number such as 0.01")
        if not 0 <= momentum < 1:
            raise ValueError(f"PaperSGD: momentum {momentum}: use 0 <= momentum < 1")
        if not weight_decay >= 0:
            raise ValueError(f"PaperSGD: weight_decay {weight_decay}: use 0 or more")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not params:
                continue
            # the rule on every tensor of the group at once (torch's multi-tensor ops: a few kernel
            # launches per group on a GPU, not a few per tensor); elementwise the same arithmetic
            v = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(v, momentum)
            if decay:
                torch._foreach_add_(v, params, alpha=-decay * lr)
            torch._foreach_add_(v, [p.grad for p in params], alpha=-lr)
            torch._foreach_add_(params, v)
        return loss


UPDATES = ("paper", "torch")   # --update: the paper's form (PaperSGD) or torch.optim.SGD's


def make_optimizer(update, groups, lr, momentum, weight_decay=0.0, fused=False):
    """The optimizer of --update over parameter groups (each may set lr and weight_decay). fused:
    torch.optim.SGD's fused kernel (CUDA); PaperSGD always runs as multi-tensor ops."""
    if update == "paper":
        return PaperSGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if update == "torch":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               **({"fused": True} if fused else {}))
    raise ValueError(f"unknown update rule {update!r}: use {' or '.join(UPDATES)}")


def check_resume_update(saved_config, update, path):
    """A checkpoint's velocities are in the units of the rule that made them: refuse another (one line).
    Checkpoints from before --update existed were made by torch.optim.SGD."""
    saved = (saved_config or {}).get("update", "torch")
    if saved != update:
        raise UsageError(f"checkpoint {path} was trained with --update {saved}, this run asks for --update "
                         f"{update}: the saved velocities are in the other rule's units; resume with "
                         f"--update {saved}")


def dexp_rates(base, tgt_factor, num_steps):
    """cuda-convnet2's DiscreteExpParameterSchedule rates (lr.cu): num_steps of them."""
    rates = [base * (1.0 / tgt_factor) ** (i / (num_steps - 1)) for i in range(num_steps - 1)]
    return rates + [base / tgt_factor]


def dexp_value(rates, progress):
    """The rate at training progress `progress` in [0, 1] (lr.cu, DiscreteExpParameterSchedule::getValue)."""
    for i, rate in enumerate(rates):
        if progress <= (i + 1) / len(rates):
            return rate
    return rates[-1]


def parse_dexp(text, flag):
    """"250,4" -> (250.0, 4): a dexp's target factor and number of steps (one line if malformed)."""
    parts = str(text).split(",")
    try:
        factor, steps = float(parts[0]), int(parts[1])
        ok = len(parts) == 2 and factor >= 1 and steps >= 1
    except (ValueError, IndexError):
        ok = False
    if not ok:
        raise UsageError(f"{flag} {text}: write TARGET_FACTOR,STEPS with a factor >= 1 and 1 or more "
                         f"steps, e.g. {flag} 250,4")
    return factor, steps


class DexpSchedule:
    """cuda-convnet2's dexp schedules, one per parameter group, by training progress (not by validation).

    groups: [(base, tgt_factor, num_steps)] in the optimizer's group order. before_step(step, total)
    sets every group's lr for the step that follows `step` finished steps of `total`. Stateless: the
    rates follow from the step, so a resumed run continues exactly."""

    def __init__(self, optimizer, groups):
        if len(groups) != len(optimizer.param_groups):
            raise ValueError(f"{len(groups)} dexp schedules for {len(optimizer.param_groups)} parameter groups")
        self.optimizer = optimizer
        self.rates = [dexp_rates(*g) for g in groups]

    def before_step(self, step, total):
        progress = min(1.0, max(0.0, step / total)) if total else 0.0
        for group, rates in zip(self.optimizer.param_groups, self.rates):
            group["lr"] = dexp_value(rates, progress)

    def step(self, error):                      # the plateau schedule's hook: dexp ignores validation
        return False

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class PlateauOnError(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """The paper's schedule (§5): divide the lr (every group's) by 10 when the validation error rate
    stops improving with the current rate, at most max_drops times (the paper: three).

    torch's ReduceLROnPlateau on the top-1 error (mode min), with threshold 0 (any lower error is an
    improvement), no cooldown, eps 0, and each group's min_lr its current lr times factor once per drop
    left, multiplied in turn as the drops multiply (so the capped lr is the same float): after more
    than `patience` evaluations in a row without a new best, every group's lr is multiplied by
    `factor`, at most `max_drops` times in all. step(error) returns whether it dropped; `drops` counts
    them. Its state is (best, bad, drops), as checkpoints have held it."""

    def __init__(self, optimizer, factor=0.1, patience=5, max_drops=3):
        self.drops = 0
        super().__init__(optimizer, mode="min", factor=factor, patience=patience, threshold=0.0,
                         threshold_mode="abs", cooldown=0, min_lr=0.0, eps=0.0)
        self.configure(factor, patience, max_drops)

    def configure(self, factor, patience, max_drops):
        """factor, patience and the cap (a resume's flags), the floors from the current lrs and drops."""
        self.factor, self.patience, self.max_drops = factor, patience, max_drops
        self.min_lrs = []
        for group in self.optimizer.param_groups:
            lr = group["lr"]
            for _ in range(max(0, max_drops - self.drops)):
                lr *= factor
            self.min_lrs.append(lr)

    def step(self, error):
        before = [g["lr"] for g in self.optimizer.param_groups]
        super().step(error)
        dropped = any(g["lr"] != lr for g, lr in zip(self.optimizer.param_groups, before))
        self.drops += dropped
        return dropped

    def state_dict(self):
        return dict(best=self.best, bad=self.num_bad_epochs, drops=self.drops)

    def load_state_dict(self, state):
        self.best, self.num_bad_epochs, self.drops = state["best"], state["bad"], state["drops"]
        self.configure(self.factor, self.patience, self.max_drops)
