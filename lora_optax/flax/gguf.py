"""Reading GGUF files (llama.cpp's model format): metadata, tensor index, dequantized weights.

The block formats (Q4_K, Q5_0, Q6_K, Q8_0, …) are decoded by the ``gguf`` package
(``gguf.quants.dequantize``, llama.cpp's own Python reference), which also gives the
type codes and block sizes. The header is parsed here: ``gguf.GGUFReader`` builds one
NumPy memmap view per array element, which takes ~20 s for the 262 144-entry
vocabulary of a Gemma 3 file; this parser reads the same header in well under a
second (tests compare the two on files written by ``gguf.GGUFWriter``).

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, version, tensor count, metadata
count, the metadata ``key: typed value`` pairs, one ``(name, dims, type, offset)``
record per tensor, padding to ``general.alignment`` (default 32), then the tensor data.
``dims`` lists the fastest axis first; :func:`GGUFFile.array` returns NumPy order
(reversed), i.e. a ``(out, in)`` matrix for llama.cpp's ``[in, out]`` weights.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUFError", "GGUFFile", "GGUFTensorInfo", "read_gguf"]

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format (scalars).
_SCALAR_FORMATS = {
    0: "B",  # UINT8
    1: "b",  # INT8
    2: "H",  # UINT16
    3: "h",  # INT16
    4: "I",  # UINT32
    5: "i",  # INT32
    6: "f",  # FLOAT32
    7: "?",  # BOOL
    10: "Q",  # UINT64
    11: "q",  # INT64
    12: "d",  # FLOAT64
}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """A file that is not a readable GGUF file, or one this loader cannot use."""


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file: name, NumPy-order shape, block type, byte range."""

    name: str
    shape: tuple[int, ...]  # NumPy order (slowest axis first)
    type_code: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return _type_name(self.type_code)


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading GGUF files needs the gguf package: pip install 'lora_optax[gemma3]'."
        ) from e
    return gguf


def _type_name(code: int) -> str:
    gguf = _gguf()
    try:
        return gguf.GGMLQuantizationType(code).name
    except ValueError:
        return f"unknown type {code}"


_U64 = struct.Struct("<Q")


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def _need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise GGUFError(
                f"{self.path}: truncated GGUF header ({what}: needed {n} bytes at offset "
                f"{self.pos}, the file has {self.size})."
            )

    def take(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        self._need(size, "value")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        self._need(n, "string")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        # The hot loop of a 262k-token vocabulary: locals only, one bounds check at the end.
        buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
        out = []
        try:
            for _ in range(count):
                (n,) = unpack(buf, pos)
                out.append(buf[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"))
                pos += 8 + n
        except struct.error as e:
            raise GGUFError(f"{self.path}: truncated GGUF string array at {pos}.") from e
        if pos > self.size:
            raise GGUFError(f"{self.path}: truncated GGUF string array at {self.pos}.")
        self.pos = pos
        return out

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("I"), self.take("Q")
            return self.array(etype, count)
        fmt = _SCALAR_FORMATS.get(vtype)
        if fmt is None:
            raise GGUFError(f"{self.path}: unknown GGUF metadata type {vtype} at {self.pos}.")
        return self.take(fmt)

    def array(self, etype: int, count: int) -> Any:
        if etype == _STRING:
            return self.strings(count)
        if etype == _ARRAY:
            return [self.value(_ARRAY) for _ in range(count)]
        fmt = _SCALAR_FORMATS.get(etype)
        if fmt is None:
            raise GGUFError(f"{self.path}: unknown GGUF array type {etype} at {self.pos}.")
        size = struct.calcsize(fmt) * count
        self._need(size, "array")
        out = np.frombuffer(self.buf, dtype=np.dtype("<" + fmt), count=count, offset=self.pos)
        self.pos += size
        return out.copy()


class GGUFFile:
    """A GGUF file's metadata and tensor index; tensor data is read on demand.

    Use :func:`read_gguf` to open one. ``metadata`` maps keys to Python scalars,
    strings, lists of strings or NumPy arrays; ``tensors`` maps names to
    :class:`GGUFTensorInfo`.
    """

    def __init__(self, path: Path, metadata: dict[str, Any], tensors: dict[str, GGUFTensorInfo]):
        self.path = path
        self.metadata = metadata
        self.tensors = tensors
        self._data: np.memmap | None = None

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return str(arch) if arch is not None else None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (a read-only memmap slice)."""
        info = self.tensors[name]
        if self._data is None:
            self._data = np.memmap(self.path, mode="r")
        return self._data[info.offset : info.offset + info.nbytes]

    def array(self, name: str, dtype: Any = np.float32) -> np.ndarray:
        """The tensor dequantized to float32 (then cast to ``dtype``), NumPy-order shape."""
        gguf = _gguf()
        info = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(info.type_code)
        raw = self.raw(name)
        if qtype == gguf.GGMLQuantizationType.F32:
            out = raw.view(np.float32)
        else:
            out = gguf.quants.dequantize(raw, qtype)
        out = np.asarray(out).reshape(info.shape)
        return out.astype(dtype, copy=False) if out.dtype != dtype else out

    def check_block_types(self, names: Iterable[str] | None = None) -> None:
        """Decodes the first block of each distinct block type, before anything is loaded.

        Raises:
          GGUFError: naming the first tensor of a block type ``gguf`` cannot decode.
        """
        gguf = _gguf()
        first: dict[int, str] = {}
        for name in self.tensors if names is None else names:
            first.setdefault(self.tensors[name].type_code, name)
        for code, name in first.items():
            try:
                qtype = gguf.GGMLQuantizationType(code)
                _, type_size = gguf.GGML_QUANT_SIZES[qtype]
                raw = np.asarray(self.raw(name)[:type_size])
                if qtype != gguf.GGMLQuantizationType.F32:
                    gguf.quants.dequantize(raw, qtype)
            except (ValueError, KeyError, NotImplementedError) as e:
                raise GGUFError(
                    f"{self.path}: tensor {name!r} uses block type {_type_name(code)}, which "
                    f"the gguf package {getattr(gguf, '__version__', '')} cannot dequantize "
                    f"({type(e).__name__}: {e}). Re-quantize the model (e.g. Q4_K_M or Q8_0) "
                    "or upgrade gguf."
                ) from e

    def close(self) -> None:
        self._data = None


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Opens a GGUF file: parses its header (metadata and tensor index).

    Raises:
      FileNotFoundError: when ``path`` does not exist.
      GGUFError: when it is not a GGUF v2/v3 little-endian file, or its header or
        tensor index is inconsistent with the file size.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        if head != _MAGIC:
            raise GGUFError(
                f"{path} is not a GGUF file: it starts with {head!r}, not {_MAGIC!r} "
                f"({size} bytes)."
            )
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        metadata, records, header_end = _parse_header(_Cursor(mm, path))
    return _index(path, size, metadata, records, header_end)


def _parse_header(cur: _Cursor) -> tuple[dict[str, Any], list[Any], int]:
    path = cur.path
    cur.pos = 4
    version = cur.take("I")
    if version not in _SUPPORTED_VERSIONS:
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise GGUFError(
            f"{path}: GGUF version {version}{hint} is not supported; expected "
            f"{' or '.join(map(str, _SUPPORTED_VERSIONS))}."
        )
    n_tensors, n_kv = cur.take("Q"), cur.take("Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.take("I"))
    records = []
    for _ in range(n_tensors):
        name = cur.string()
        ndim = cur.take("I")
        dims = tuple(int(cur.take("Q")) for _ in range(ndim))
        code, offset = cur.take("I"), cur.take("Q")
        records.append((name, dims, code, offset))
    return metadata, records, cur.pos


def _index(
    path: Path, size: int, metadata: dict[str, Any], records: list[Any], header_end: int
) -> GGUFFile:
    gguf = _gguf()
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment {alignment} is not a power of two.")
    start = -(-header_end // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, code, offset in records:
        shape = tuple(reversed(dims))
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(code)]
        except (ValueError, KeyError) as e:
            raise GGUFError(
                f"{path}: tensor {name!r} has block type {_type_name(code)}, unknown to the "
                "gguf package; upgrade gguf or re-quantize the model."
            ) from e
        n = int(np.prod(shape)) if shape else 1
        if dims and dims[0] % block:
            raise GGUFError(
                f"{path}: tensor {name!r} rows of {dims[0]} values do not fill whole "
                f"{_type_name(code)} blocks of {block}."
            )
        nbytes = n // block * type_size
        begin = start + int(offset)
        if begin + nbytes > size:
            raise GGUFError(
                f"{path}: tensor {name!r} ({_type_name(code)}, shape {shape}) ends at byte "
                f"{begin + nbytes}, past the end of the file ({size} bytes): truncated file?"
            )
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name!r} appears twice in the tensor index.")
        tensors[name] = GGUFTensorInfo(name, shape, int(code), begin, nbytes)
    return GGUFFile(path, metadata, tensors)
