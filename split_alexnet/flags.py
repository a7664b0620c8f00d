"""The flags every launcher shares, declared once: --net, --streams, --precision, --image-size. Each
launcher gives its own help (what the flag means there); the choices, names and types are these."""
from .precision import PRECISIONS
from .spec import NETS


def add_net(p, help):
    p.add_argument("--net", choices=list(NETS), default="paper", help=help)


def add_streams(p, help, default=None):
    """default None: spec.default_streams (2, and 1 for --net half) once --net is known."""
    p.add_argument("--streams", type=int, default=default, help=help)


def add_precision(p, help, choices=tuple(PRECISIONS), dtype_alias=False, group=None):
    """--precision (fp32, bf16, fp16; the check adds fp64); dtype_alias: --dtype, its older name."""
    names = ("--precision", "--dtype") if dtype_alias else ("--precision",)
    kwargs = dict(choices=list(choices)) if choices else {}
    (group or p).add_argument(*names, dest="precision", default="fp32", help=help, **kwargs)


def add_image_size(p, help=None, default=227):
    p.add_argument("--image-size", type=int, default=default, help=help)
