"""split_alexnet: the 2012 two-GPU AlexNet in PyTorch, in three layouts that compute the same function."""
from .spec import Spec, LAYERS, allowed_streams
from .model import (AlexNet, Stream, StreamsAlexNet, SplitAlexNet, shard_state_dict, join_state_dicts,
                    streams_from_single, split_from_single, init_weights)

__all__ = ["Spec", "LAYERS", "allowed_streams", "AlexNet", "Stream", "StreamsAlexNet", "SplitAlexNet",
           "shard_state_dict", "join_state_dicts", "streams_from_single", "split_from_single",
           "init_weights"]
