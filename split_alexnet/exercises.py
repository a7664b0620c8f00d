"""The exercises' arguments (docs/tutorial.md, "Exercises"; answers in docs/solutions.md). Never used in
training. Each exercise is passed to the check as arguments of the models it builds, never by changing
a class or a module:

- `keep-own-slice`:     SplitAlexNet(gather_rule=keep_own_slice): the backward of conv3..fc8's exchange
                        (`comm.gather_for_distinct_kernels`) keeps this rank's slice of the gradient
                        instead of summing it over ranks (reduce-scatter). The forward is unchanged. Only
                        the split layout has this rule written down (the streams layout gets it from
                        autograd), so it applies to the split layout.
- `lrn-across-streams`: AlexNet(lrn_across_streams=True): the single layout's local response
                        normalisation spans all channels, as Caffe's bvlc_alexnet does, instead of each
                        stream's own (as cuda-convnet2 ran it). The other layout keeps it per stream, so
                        the two compute different functions.

And the coding exercises: `launch/check.py --gather-backward FILE` / `--logits-backward FILE` load the
function `backward(grad, sizes, group, dim)` from FILE (a learner's copy of exercises/gather_backward.py
or exercises/logits_backward.py) and pass it as SplitAlexNet's gather_rule / logits_rule.
"""
import importlib.util
from pathlib import Path

from . import comm

EXERCISES = ("keep-own-slice", "lrn-across-streams")


# the rule of gather_for_same_computation (comm.keep_own_slice), which exercise 2 puts at the wrong place:
# the gathers before conv3..fc8, whose gradients must be summed, not sliced
keep_own_slice = comm.keep_own_slice


def options(name):
    """The check's `options` for exercise `name` (one of EXERCISES): {"single": {...}, "split": {...}}."""
    if name not in EXERCISES:
        raise ValueError(f"--exercise {name}: use one of {', '.join(EXERCISES)}")
    return {"keep-own-slice": {"split": {"gather_rule": keep_own_slice}},
            "lrn-across-streams": {"single": {"lrn_across_streams": True}}}[name]


def load_rule(path, flag):
    """The function `backward` of the Python file `path` (a learner's backward rule)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file; copy the template first, e.g. "
                         f"cp exercises/gather_backward.py /tmp/my_backward.py")
    spec = importlib.util.spec_from_file_location(f"learner_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the learner's file: say where it broke, in one line
        raise ValueError(f"{flag} {path} does not load: {type(e).__name__}: {e}") from None
    rule = getattr(module, "backward", None)
    if not callable(rule):
        raise ValueError(f"{flag} {path} defines no function backward(grad, sizes, group, dim)")

    def backward(grad, sizes, group, dim):
        try:
            return rule(grad, sizes, group, dim)
        except Exception as e:  # noqa: BLE001  the learner's code: name the file and the error
            raise comm.RuleError(f"{path}: backward raised {type(e).__name__}: {e}") from None

    backward.__name__ = f"backward of {path}"
    return backward
