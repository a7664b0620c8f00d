"""Checkpoints: one file per stream (or one for the single layout) plus meta.pt, written atomically.

  CKPT/meta.pt            layout, streams, spec, step, epoch, batch, lr, scheduler, GradScaler
                          (fp16: its state_dict()), torch RNG, files
  CKPT/stream0.pt ...     split / streams layouts: {"model": one stream's state_dict, "optimizer": the
                          optimizer's state_dict() for its parameters, keyed by parameter name,
                          "dropout": the masks' {seed, draws}} (before: "momentum": {name: SGD buffer},
                          which still loads)
  CKPT/single.pt          single layout: the same for the whole net

Every file is written to a temporary name, fsynced, and renamed (os.replace), and the directory is
fsynced; meta.pt, which lists the other files with their sizes and sha256 checksums, is written last, so a directory without it (or with a shorter file than it
lists, or one whose checksum differs) is an interrupted save or a damaged file and is refused; the
temporary files of an interrupted save are removed at the next save. Every file is loaded with
torch.load(weights_only=True): a checkpoint holds data (tensors, dicts, lists, str, int, float), never
code, and one that holds anything else is refused before it can run. Nothing is loaded into a model until every file has been
read and checked against it. Reading treats a checkpoint as untrusted input: names, files, fields and
tensors are checked before use (untrusted.py, untrusted_meta.py; docs/troubleshooting.md, "Checkpoints").
Weights and momentum buffers are cut along dim 0 exactly as model.shard_state_dict cuts them, so
`cut`/`join` convert between layouts bit for bit.
"""
# the files and their writing, the untrusted reading, the conversions: where they live (callers use
# ckpt.read_meta, ckpt.save_files, ckpt.join, ...)
from .checkpoint_files import (  # noqa: F401
    FORMAT,
    SPEC_FIELDS,
    DiskFull,
    atomic_save,
    load_optimizer_states,
    load_stream_state,
    momentum,
    newest_complete,
    optimizer_state,
    prune,
    remove_stale_temps,
    run_dir_of,
    save_files,
    save_meta,
    sha256,
    shard_names,
    single_files,
    spec_dict,
    stream_state,
)
from .convert import cut, export_state_dict, join, load_exported  # noqa: F401
from .untrusted import find_checkpoint, load_files, read_meta  # noqa: F401
from .untrusted_meta import (  # noqa: F401
    SPEC_DEFAULTS,
    check_matches,
    check_meta,
    check_resumed_config,
    expected_tensors,
    max_file_bytes,
    spec_of,
)
