"""--precision fp32|bf16|fp16, shared by train, check and bench: the names, whether autocast really runs
in the dtype on this device, and the autocast context around forward + loss.

bf16/fp16 are mixed precision through `torch.autocast`: the weights, gradients and SGD state stay fp32;
convolutions and matmuls run in the half dtype (with fp32 accumulation in oneDNN and cuBLAS), so the
activations, and so the split's exchanges, are 2-byte tensors. fp16 training needs a GradScaler
(`torch.amp.GradScaler`): small gradients underflow fp16's 2^-24 otherwise. bf16 has fp32's exponent
range and needs none.
"""
import contextlib
import importlib
import warnings

import torch

from .errors import UsageError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# the check's --precision (the bench's names, fp64, and the torch dtype names --dtype took before it)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp64": torch.float64, "float64": torch.float64,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
# unit round-off u = 2^-p, p the significand's bits (implicit bit included): what one rounding costs
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8,
                 torch.float16: 2.0**-11}


def autocast_dtype(precision):
    """The dtype autocast runs forward + loss in, or None for fp32 (no autocast)."""
    return PRECISIONS.get(precision)


def dtype_bytes(precision):
    return 4 if autocast_dtype(precision) is None else 2


def autocast_works(device_type, dtype):
    """Whether torch.autocast(device_type, dtype) really computes a convolution in dtype here."""
    if device_type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unsupported dtype warns and disables autocast
            with torch.autocast(device_type, dtype=dtype):
                out = torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3))
        return out.dtype == dtype
    except (RuntimeError, ValueError):
        return False


def check_precision(precision, device_type):
    """Refuse an unknown precision, or one this torch cannot autocast to on the device: one line."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: use fp32, bf16 or fp16")
    dtype = PRECISIONS[precision]
    if dtype is not None and not autocast_works(device_type, dtype):
        raise UsageError(f"--precision {precision}: torch {torch.__version__} has no {device_type} "
                         f"autocast to {precision}: use --precision bf16 or fp32 on {device_type}")


def autocast(device_type, dtype):
    """torch.autocast to dtype around forward + loss, or nothing for dtype None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def compile_available():
    """(torch.compile usable here, why not)."""
    if not hasattr(torch, "compile"):
        return False, f"torch {torch.__version__} has no torch.compile"
    try:
        dynamo = importlib.import_module("torch._dynamo")  # an `import torch._dynamo` would make torch local
        if not dynamo.is_dynamo_supported():
            return False, "torch.compile is not supported on this Python"
    except Exception as e:  # noqa: BLE001 - any import failure means: not available
        return False, f"torch.compile is unavailable ({type(e).__name__}: {e})"
    return True, ""


@contextlib.contextmanager
def ieee_fp32():
    """fp32 as IEEE fp32 inside the block: no TF32 in cuDNN convolutions or CUDA matmuls.

    On Ampere and later GPUs cuDNN runs fp32 convolutions in TF32 by default (torch's
    `torch.backends.cudnn.allow_tf32 = True`): a 10-bit mantissa, unit round-off 2^-11 instead of 2^-24,
    which is not the precision the check's fp32 tolerance is derived for. A no-op on CPU.
    """
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled,
                                        benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


# ---- speed flags (train: --cudnn-benchmark, --fused-sgd; measured on and off by the bench on a GPU) ----

def set_cudnn_benchmark(device_type, flag=None):
    """cuDNN's algorithm search for every new convolution shape (--cudnn-benchmark; None: on with CUDA,
    where a step's shapes repeat, so the search's first-step cost buys every later step; off elsewhere,
    where it does nothing). It picks among algorithms of the same precision: TF32 stays as ieee_fp32 and
    torch's flags set it, so the check's error model is unchanged. Returns the value set."""
    on = device_type == "cuda" if flag is None else bool(flag)
    torch.backends.cudnn.benchmark = on
    return on


def fused_sgd(device_type, flag=None):
    """Whether SGD runs as torch's fused kernel (--fused-sgd; None: on with CUDA, one launch for every
    parameter instead of a few per tensor; it also lets a GradScaler skip an fp16 step on the device,
    without reading found_inf on the host). Off on the CPU by default: the foreach path is as fast there."""
    return device_type == "cuda" if flag is None else bool(flag)


@contextlib.contextmanager
def no_host_sync(device, enabled=True):
    """Inside the block, on CUDA, a synchronising CUDA call (an .item(), a copy to the host, a blocking
    host-to-device copy, a stream synchronize) raises RuntimeError naming it:
    torch.cuda.set_sync_debug_mode("error"), restored after. Elsewhere (or enabled=False) a no-op: a CPU
    step has no device to wait for. train.py wraps each step in it with --sync-debug."""
    if not enabled or torch.device(device).type != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)
