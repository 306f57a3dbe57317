"""Model weights read and written one tensor at a time, so that working on two models never holds both.

A model folder is what ``save_pretrained`` writes: ``model.safetensors``, or shards listed in
``model.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map": {name: shard file}}``).
A built-in model name (``smollm2-135m-instruct``) stands for its cache folder
(:func:`lmadapt.models.builtins.resolve_model_path`).

- :func:`tensor_index` reads the safetensors headers only: each tensor's file, shape and dtype.
- :func:`read_tensor` reads one tensor through ``safe_open``, whose memory map is closed again at once;
  :class:`FolderTensors` is the same as a lazy mapping.
- :class:`ShardWriter` collects tensors into shards of at most ``max_shard_bytes`` and writes each shard as
  soon as it is full, so at most one shard is in memory; on exit it names the shards as transformers does
  and writes the index when there is more than one.
- :func:`copy_model_files` copies the config and tokenizer files that sit beside the weights.

Pickled weights (``pytorch_model.bin``) are never read.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmadapt.errors import ModelError
from lmadapt.jsonfile import JsonFileError, read_json_object
from lmadapt.models.builtins import BUILTINS, find_builtin, resolve_model_path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
DEFAULT_SHARD_BYTES = 2**30  # 1 GiB: the most tensor bytes ShardWriter holds before writing them out

# Files beside the weights that describe the tokenizer, and the model (copied by copy_model_files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
MODEL_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a model folder lives, and what it is, from the safetensors header."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def model_folder(folder: str | Path) -> Path:
    """``folder`` as a path: an existing folder as given, a built-in name as its cache folder (converted on
    first use); anything else is a :class:`ModelError` naming it."""
    path = Path(folder).expanduser()
    if path.is_dir():
        return path
    if find_builtin(str(folder)) is not None:
        return resolve_model_path(str(folder))
    what = "is a file, not a folder" if path.exists() else "is neither a folder nor a built-in model"
    raise ModelError(f"{folder} {what}; give a model folder (as save_pretrained writes it) or a built-in name "
                     f"({', '.join(BUILTINS)})")


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a model folder: the shards its index lists, or ``model.safetensors``.

    A folder without either is a :class:`ModelError` that says what it holds instead (pickles are refused)."""
    path = model_folder(folder)
    if (path / INDEX_FILE).is_file():
        return sorted({path / name for name in _weight_map(path).values()})
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    pickles = [name for name in PICKLE_FILES if (path / name).is_file()]
    if pickles:
        raise ModelError(f"{path} holds only {pickles[0]}, a pickle, which lmadapt does not read (loading a pickle "
                         f"can run code); convert it to safetensors: load it with transformers in a trusted "
                         f"environment and call model.save_pretrained(folder)")
    raise ModelError(f"{path} holds no safetensors weights: it needs {SINGLE_FILE}, or {INDEX_FILE} and the shards "
                     f"it lists, as save_pretrained writes them")


def _weight_map(folder: Path) -> dict[str, str]:
    try:
        index = read_json_object(folder / INDEX_FILE)
    except JsonFileError as exc:
        raise ModelError(f"{exc}; copy or save the model again") from None
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelError(f"{folder / INDEX_FILE}: 'weight_map' must map each tensor's name to its shard file; "
                         f"copy or save the model again")
    return weight_map


def tensor_index(folder: str | Path) -> dict[str, TensorInfo]:
    """name -> :class:`TensorInfo` for every tensor of a model folder (or built-in), from the headers alone.

    A shard that is missing, truncated or not safetensors, or an index that names a tensor its shard does not
    hold, is a :class:`ModelError` naming the file."""
    path = model_folder(folder)
    out: dict[str, TensorInfo] = {}
    for file in weight_files(path):
        if not file.is_file():
            raise ModelError(f"{file} is missing (listed in {path / INDEX_FILE}); copy or save the model again")
        try:
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - a handle, not a dict
                    piece = fh.get_slice(name)
                    out[name] = TensorInfo(name, file, tuple(piece.get_shape()), _dtype(piece.get_dtype(), file))
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{file} is truncated or not safetensors ({exc}); copy or save it again") from None
    if (path / INDEX_FILE).is_file():
        stray = sorted(n for n, shard in _weight_map(path).items() if n not in out or out[n].file != path / shard)
        if stray:
            raise ModelError(f"{path / INDEX_FILE} lists {len(stray)} tensor(s) that its shards do not hold where "
                             f"it says (first: {stray[0]!r}); copy or save the model again")
    return out


def _dtype(code: str, file: Path) -> torch.dtype:
    if code not in _DTYPES:
        raise ModelError(f"{file}: tensor dtype {code} is not one lmadapt reads ({', '.join(_DTYPES)})")
    return _DTYPES[code]


def read_tensor(folder_or_index: str | Path | Mapping[str, TensorInfo], name: str) -> torch.Tensor:
    """Tensor ``name`` of a model folder (or of an index from :func:`tensor_index`, which saves reading the
    headers again on every call), read alone. :class:`ModelError` when the folder has no such tensor."""
    index = folder_or_index if isinstance(folder_or_index, Mapping) else tensor_index(folder_or_index)
    info = index.get(name)
    if info is None:
        where = next(iter(index.values())).file.parent if index else folder_or_index
        raise ModelError(f"{where} has no tensor {name!r}")
    try:
        with safe_open(str(info.file), framework="pt") as fh:
            return fh.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{info.file}: tensor {name!r} cannot be read ({exc}); copy or save it again") from None


class FolderTensors(Mapping[str, torch.Tensor]):
    """A model folder's tensors as a read-only mapping that reads each one from disk when it is asked for
    (nothing is cached): ``fingerprint(FolderTensors(folder))`` holds one tensor at a time."""

    def __init__(self, folder_or_index: str | Path | Mapping[str, TensorInfo]) -> None:
        self.index = folder_or_index if isinstance(folder_or_index, Mapping) else tensor_index(folder_or_index)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.index:
            raise KeyError(name)
        return read_tensor(self.index, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


class ShardWriter:
    """Write tensors into ``folder`` as save_pretrained lays them out, holding at most one shard in memory.

    ::

        with atomic_dir(out) as tmp, ShardWriter(tmp) as writer:
            for name in names:
                writer.add(name, tensor_for(name))

    A shard is written as soon as the next tensor would take it past ``max_shard_bytes`` (a single larger
    tensor gets a shard of its own). On a clean exit the shards are renamed ``model-0000i-of-0000n.safetensors``
    and ``model.safetensors.index.json`` is written, or, with one shard, it is named ``model.safetensors``
    and no index is written. On an exception nothing is renamed (the caller's ``atomic_dir`` removes it all).
    """

    def __init__(self, folder: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 metadata: Mapping[str, str] | None = None) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.total_bytes = 0
        self.files: list[Path] = []  # final names, once the writer has closed
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []  # (temporary shard file, its tensor names)
        self._names: set[str] = set()

    def __enter__(self) -> ShardWriter:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name``; writes the current shard first when this one would overflow it."""
        if name in self._names:
            raise ValueError(f"tensor {name!r} was added twice")
        tensor = tensor.detach().to("cpu")
        if not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.contiguous().clone()  # a view would drag its whole storage (and share it) into the file
        if self._pending and self._pending_bytes + tensor.nbytes > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._pending[name] = tensor
        self._pending_bytes += tensor.nbytes
        self.total_bytes += tensor.nbytes

    def _flush(self) -> None:
        file = self.folder / f".shard-{len(self._written):05d}.safetensors"
        save_file(self._pending, str(file), metadata=self.metadata)
        self._written.append((file, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, give the shards their final names, write the index; returns the files."""
        if self._pending or not self._written:
            self._flush()
        n = len(self._written)
        if n == 1:
            final = [self.folder / SINGLE_FILE]
        else:
            final = [self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (tmp, _), path in zip(self._written, final):
            tmp.replace(path)
        if n > 1:
            weight_map = {name: path.name for (_, names), path in zip(self._written, final) for name in names}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        self.files = final
        return final


def embedding_names(folder: str | Path) -> tuple[str | None, str | None]:
    """(input embedding, output layer) weight names of the model in ``folder``, e.g. ``model.embed_tokens.weight``
    and ``lm_head.weight``: the rows of these tensors are tokens. Found by building the model from its
    config.json on the meta device (no memory, no weights read); (None, None) when transformers cannot build it
    (an architecture it does not know). A tied output layer is named although the folder holds no tensor for it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = model_folder(folder)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError):
        return None, None
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)

    def weight_name(module: torch.nn.Module | None) -> str | None:
        return f"{names[id(module)]}.weight" if module is not None and id(module) in names else None

    return weight_name(model.get_input_embeddings()), weight_name(model.get_output_embeddings())


def copy_model_files(src: str | Path, dst: str | Path, names: tuple[str, ...] = MODEL_FILES) -> list[str]:
    """Copy the config, generation config and tokenizer files of model folder ``src`` (or a built-in) into
    ``dst`` (``names``: which of them; :data:`TOKENIZER_FILES` for the tokenizer alone); returns the names
    copied. The weights are not copied."""
    source, target = model_folder(src), Path(dst)
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    return copied
