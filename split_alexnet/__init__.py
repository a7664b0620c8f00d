"""split_alexnet: the 2012 two-GPU AlexNet in PyTorch, in three layouts that compute the same function."""
from .model import (
                    AlexNet,
                    SplitAlexNet,
                    Stream,
                    StreamsAlexNet,
                    init_weights,
                    join_state_dicts,
                    shard_state_dict,
                    split_from_single,
                    streams_from_single,
)
from .optim import PaperSGD
from .spec import LAYERS, Spec, allowed_streams

__all__ = ["Spec", "LAYERS", "allowed_streams", "AlexNet", "Stream", "StreamsAlexNet", "SplitAlexNet",
           "shard_state_dict", "join_state_dicts", "streams_from_single", "split_from_single",
           "init_weights", "PaperSGD"]
