"""Sharded checkpoints with torch.distributed.checkpoint (DCP): under FSDP every rank writes its own shards of the
weights, optimizer moments and weight average, so no rank ever holds the whole state, and the shards load back on
any number of processes, sharded or not (DCP reshards them on load).

A sharded checkpoint's tensors are one DCP directory, `<checkpoint>/shards/`: `.metadata` (the index: each tensor's
name, global shape and dtype, which file holds which piece of it) and one `__<rank>_0.distcp` per rank that wrote.
engine/checkpoint.py puts it in a checkpoint directory beside meta.json and state.pt and seals it with COMPLETE.

DCP pickles `.metadata`, and a pickle can run code when loaded: ShardReader reads it with an unpickler that builds
only DCP's own index classes (and the torch sizes, dtypes and paths inside them) and refuses anything else, then
refuses an index naming anything but tensors (DCP would load other entries with a full unpickler) or pieces outside
this directory's shard files, so a hostile checkpoint is one line, never code. The tensors themselves DCP loads with
torch.load(weights_only=True).
"""

import io
import math
import os
import pickle
import re
import warnings
from concurrent.futures import Future

import torch

from engine.errors import UserError

SHARDS = "shards"  # the DCP directory inside a checkpoint

# what DCP's metadata pickle may build: its own index dataclasses, and the torch and pathlib values they hold
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _IndexUnpickler(pickle._Unpickler):  # (the Python one: its BUILD can be checked, below)
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        value = getattr(torch, name, None) if module == "torch" else None
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):  # values, not callables
            return value
        if name not in _ALLOWED.get(module, ()):
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's index")
        return super().find_class(module, name)

    def load_build(self):
        if isinstance(self.stack[-2], type):  # setting attributes of a class would change it for the whole process
            raise pickle.UnpicklingError("the index sets attributes of a class")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


_SHARD_FILE = re.compile(r"^__\d+_\d+\.distcp$")  # the files DCP's writer names, one a rank


def _check_index(metadata) -> str | None:
    """What is wrong with a DCP index for our checkpoints, or None: every entry a tensor (our shards hold nothing
    else: DCP loads other entries with a full unpickler), of a real dtype and non-negative sizes, whose pieces are
    in plain shard files of this directory, untransformed."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata

    if not isinstance(metadata, Metadata) or not isinstance(metadata.planner_data, dict):
        return "not an index"
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        return "not an index"
    for key, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata) or not isinstance(item.properties.dtype, torch.dtype):
            return f"{str(key)[:80]} is not a tensor"
        if not all(isinstance(d, int) and d >= 0 for d in item.size):
            return f"{str(key)[:80]} has a negative or non-integer size"
    for index, info in metadata.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            return "not an index"
        if not isinstance(info.relative_path, str) or not _SHARD_FILE.match(info.relative_path):
            return f"a piece is in {str(info.relative_path)[:80]}, not a shard file"
        if info.transform_descriptors or min(info.offset, info.length) < 0:
            return f"a piece in {info.relative_path} is transformed or out of range"
    return None


def _reader(directory: str):
    """DCP's FileSystemReader, reading the index with _IndexUnpickler (made on first use: importing DCP costs a
    second of every start-up, so only sharded runs and readers of sharded checkpoints pay it)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class ShardReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs) -> Metadata:
            file = os.path.join(directory, ".metadata")
            try:
                with open(file, "rb") as f:
                    metadata = _IndexUnpickler(io.BytesIO(f.read())).load()
            except Exception as e:  # a refused class, a truncated or foreign file: not an index of ours
                raise UserError(f"{file} is not a checkpoint index ({type(e).__name__}: {str(e)[:200]})") from None
            problem = _check_index(metadata)
            if problem:
                raise UserError(f"{file} is not a checkpoint index of ours: {problem}")
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return ShardReader(directory)


def write_shards(directory: str, tensors: dict, group, asynchronous: bool) -> Future:
    """Write this rank's shards of `tensors` (nested dicts of tensors, DTensors for sharded ones) to `directory`, a
    collective over `group`. Asynchronous: the tensors are copied now (training may change them from here on) and
    written by a background thread; the future completes once this rank's files are written and, on rank 0, the
    index too (after every rank has written). Synchronous: written before returning."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(directory, sync_files=True)
    if asynchronous:
        return dcp.async_save(tensors, storage_writer=writer, process_group=group)
    future = Future()
    future.set_result(dcp.save(tensors, storage_writer=writer, process_group=group))
    return future


def load_shards(directory: str, tensors: dict) -> None:
    """Load the shards into `tensors` in place: a dict shaped like the one written (DTensors as this run shards
    them, or whole tensors), a collective over the default group."""
    import torch.distributed.checkpoint as dcp

    dcp.load(tensors, storage_reader=_reader(directory))


def shard_shapes(directory: str) -> dict[tuple, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor the shards hold, by its path in the nested dicts written (e.g. ("model", "lm_head.weight")): its
    whole shape and dtype, read from the index alone."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = _reader(directory).read_metadata()
    return {
        tuple(metadata.planner_data[key]): (tuple(item.size), item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata) and key in metadata.planner_data
    }


def read_shards(directory: str, top: str) -> dict:
    """The whole tensors under top-level key `top` ("model", "optimizers", "ema"), as nested dicts, in this process
    alone: the shards of every rank that wrote them put together. A index whose tensors would take more memory than
    the shard files hold is refused before anything is allocated."""
    import torch.distributed.checkpoint as dcp

    wanted = {path: spec for path, spec in shard_shapes(directory).items() if path[0] == top}
    size = sum(math.prod(shape) * dtype.itemsize for shape, dtype in wanted.values())  # (sizes checked >= 0)
    stored = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".distcp"))
    if size > stored:
        raise UserError(f"{directory}/.metadata names {size:,} bytes of tensors, the shards hold {stored:,}: damaged")
    flat = {".".join(map(str, path)): torch.empty(shape, dtype=dtype) for path, (shape, dtype) in wanted.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(flat, storage_reader=_reader(directory), no_dist=True)
    out: dict = {}
    for path, t in zip(wanted, flat.values(), strict=True):
        node = out
        for key in path[1:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = t
    return out
