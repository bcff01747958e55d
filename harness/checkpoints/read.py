"""Read a checkpoint file without running code from it, and find the state dict inside.

  * PyTorch files (zip and legacy) go through ``torch.load(weights_only=True)`` with a short
    allow-list of harmless types (argparse.Namespace, pathlib paths, numpy arrays/scalars/dtypes);
  * ``.pkl`` files (detectron2, MSRA caffe2) go through a restricted unpickler that only
    rebuilds numpy arrays and builtin containers;
  * safetensors files hold tensors only.
Anything else is refused with one line naming the type. ``unsafe_load=True`` (CLI
``--unsafe-load``) is the documented-as-dangerous exception: a full pickle load that can run
arbitrary code from the file; never the default.
"""

from __future__ import annotations

import argparse
import pathlib
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.errors import HarnessError

# ----------------------------------------------------------------------------- safe reading
try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray
    from numpy.core import numeric as _np_numeric

_NP_DTYPE_CLASSES = [getattr(np.dtypes, n) for n in getattr(np.dtypes, "__all__", [])
                     if isinstance(getattr(np.dtypes, n), type)]
_NP_FUNCS = {
    "_reconstruct": _np_multiarray._reconstruct,
    "scalar": _np_multiarray.scalar,
    "_frombuffer": _np_numeric._frombuffer,
}

# (module, name) -> object for the restricted .pkl unpickler: numpy array reconstruction + containers.
_PKL_ALLOWED: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("codecs").encode,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _PKL_ALLOWED[(_mod, "_reconstruct")] = _NP_FUNCS["_reconstruct"]
    _PKL_ALLOWED[(_mod, "scalar")] = _NP_FUNCS["scalar"]
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _PKL_ALLOWED[(_mod, "_frombuffer")] = _NP_FUNCS["_frombuffer"]
for _cls in _NP_DTYPE_CLASSES:
    _PKL_ALLOWED[("numpy.dtypes", _cls.__name__)] = _cls


def _torch_safe_globals() -> list:
    """Extra types ``torch.load(weights_only=True)`` may rebuild: ones real checkpoints hold."""
    safe: list = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath,
                  pathlib.WindowsPath, pathlib.PureWindowsPath, np.ndarray, np.dtype, *_NP_DTYPE_CLASSES]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        safe += [(_NP_FUNCS["_reconstruct"], f"{mod}._reconstruct"), (_NP_FUNCS["scalar"], f"{mod}.scalar")]
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        safe.append((_NP_FUNCS["_frombuffer"], f"{mod}._frombuffer"))
    return safe


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for ``.pkl`` weight files: numpy arrays and builtin containers, nothing else."""

    def find_class(self, module, name):
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        obj = _PKL_ALLOWED.get((module, name))
        if obj is None:
            raise _Refused(f"{module}.{name}")
        return obj

    def persistent_load(self, pid):
        raise _Refused("persistent id (a torch.save file saved with plain pickle)")


class _Refused(pickle.UnpicklingError):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise HarnessError(f"{path}: empty file, not a checkpoint")
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < (100 << 20):
        return "safetensors"
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return "torch-legacy"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if head[:1] in (b"(", b"}", b"]"):
        return "pickle"
    raise HarnessError(
        f"{path}: not a checkpoint (unrecognised format: not a PyTorch file, pickle or safetensors; first bytes {head[:8]!r})"
    )


def read_checkpoint(path, unsafe_load: bool = False) -> tuple[object, str, dict]:
    """Load a checkpoint file without running code from it -> ``(object, container, metadata)``.

    ``container`` is ``torch-zip``, ``torch-legacy``, ``pickle`` or ``safetensors``; ``metadata``
    is the safetensors header metadata (empty otherwise). ``unsafe_load=True`` is DANGEROUS: it
    unpickles everything and can execute code hidden in the file.
    """
    path = Path(path)
    if not path.exists():
        raise HarnessError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise HarnessError(f"{path}: not a file")
    container = _sniff(path)
    if container == "safetensors":
        return _read_safetensors(path)
    if container == "pickle":
        return _read_pickle(path, unsafe_load), container, {}
    return _read_torch(path, container, unsafe_load), container, {}


def _read_safetensors(path: Path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = OrderedDict((k, f.get_tensor(k)) for k in f.keys())
    except Exception as exc:  # SafetensorError, OSError
        raise HarnessError(f"{path}: unreadable safetensors file (truncated or corrupt?): {_first_line(exc)}") from exc
    return tensors, "safetensors", meta


def _read_pickle(path: Path, unsafe_load: bool):
    try:
        with open(path, "rb") as f:
            if unsafe_load:
                return pickle.load(f, encoding="latin1")  # DANGEROUS by request: may run code
            return _RestrictedUnpickler(f, encoding="latin1").load()
    except _Refused as exc:
        raise HarnessError(
            f"{path}: refused: the pickle holds {exc.what!r}, which is not a numpy array or builtin container "
            "(loading it could run code from the file); if you trust the file, pass --unsafe-load"
        ) from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError,
            UnicodeDecodeError) as exc:
        raise HarnessError(f"{path}: unreadable pickle (truncated or corrupt?): {_first_line(exc)}") from None


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_BUILD_RE = re.compile(r"but got <class '([\w.]+)'>")


def _read_torch(path: Path, container: str, unsafe_load: bool):
    # An open file, not the path: torch.load reads any path named *.safetensors as safetensors, whatever it holds.
    try:
        with open(path, "rb") as f:
            if unsafe_load:
                return torch.load(f, map_location="cpu", weights_only=False)  # DANGEROUS by request
            with torch.serialization.safe_globals(_torch_safe_globals()):
                return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        m = _GLOBAL_RE.search(text) or _BUILD_RE.search(text)
        if m or "Weights only load failed" in text:
            what = m.group(1) if m else _weights_only_reason(text)
            raise HarnessError(
                f"{path}: refused: the checkpoint holds {what!r}, which is not on the allow-list of harmless types "
                "(loading it could run code from the file); if you trust the file, pass --unsafe-load"
            ) from None
        raise HarnessError(f"{path}: unreadable checkpoint (truncated or corrupt?): {_first_line(exc)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise HarnessError(f"{path}: unreadable checkpoint (truncated or corrupt?): {_first_line(exc)}") from None


def _weights_only_reason(text: str) -> str:
    for line in text.splitlines():
        if "WeightsUnpickler error" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip() or "an unsupported pickle instruction"
    return "an unsupported type"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# ----------------------------------------------------------------------------- finding the state dict
def is_array(v) -> bool:
    return isinstance(v, (torch.Tensor, np.ndarray))


def count_tensors(obj, depth: int = 0) -> int:
    if is_array(obj):
        return 1
    if depth > 6:
        return 0
    if isinstance(obj, dict):
        return sum(count_tensors(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(count_tensors(v, depth + 1) for v in obj)
    return 0


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and any(is_array(v) for v in obj.values()) and all(isinstance(k, str) for k in obj)


# Preferred top-level entries holding the weights, in order (DINO teacher, timm EMA, ...).
WRAPPER_KEYS = ("teacher", "state_dict_ema", "state_dict", "model", "module", "backbone", "encoder",
                "student", "net", "network", "blobs", "params", "weights")


def select_state_dict(obj, key: str | None):
    """-> (state dict, entry path, [(entry name, value)] of the entries not used).

    ``key`` (``a/b`` for nested) names the entry; otherwise known wrappers are unwrapped in the
    order of ``WRAPPER_KEYS`` (a nested dict holding tensors under such a key is a wrapper: a real
    state dict maps names to tensors, never to dicts).
    """
    path: list[str] = []
    others: list[tuple[str, object]] = []
    cur = obj
    if key is not None:
        for part in key.split("/"):
            if not isinstance(cur, dict) or part not in cur:
                names = sorted(map(str, cur)) if isinstance(cur, dict) else []
                entries = (", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
                           if isinstance(cur, dict) else f"it holds a {type(cur).__name__}")
                raise HarnessError(f"checkpoint has no entry {key!r} (entries: {entries})")
            others += [("/".join(path + [str(k)]), v) for k, v in cur.items() if k != part]
            path.append(part)
            cur = cur[part]
    for _ in range(4):
        if not isinstance(cur, dict):
            break
        choice = next((k for k in WRAPPER_KEYS if isinstance(cur.get(k), dict) and count_tensors(cur[k]) > 0), None)
        if choice is None:
            break
        others += [("/".join(path + [str(k)]), v) for k, v in cur.items() if k != choice]
        path.append(choice)
        cur = cur[choice]
    if _is_state_dict(cur):
        return cur, path, others
    if isinstance(obj, dict):
        entries = sorted(map(str, obj))[:12]
        raise HarnessError(f"no state dict found in the checkpoint (top-level entries: {entries}); pass --key ENTRY")
    raise HarnessError(f"no state dict found in the checkpoint (it holds a {type(obj).__name__})")


def to_tensor(v) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    arr = np.asarray(v)
    if arr.dtype == object:
        raise HarnessError("checkpoint holds an object array where a weight was expected")
    if not (arr.flags.c_contiguous and arr.flags.writeable):
        arr = np.array(arr, order="C", copy=True)
    return torch.from_numpy(arr)


def strip_wrappers(key: str) -> str:
    """Remove DDP's leading ``module.`` and torch.compile's ``_orig_mod.`` segments."""
    parts = [p for p in key.split(".") if p != "_orig_mod"]
    while parts and parts[0] == "module" and len(parts) > 1:
        parts = parts[1:]
    return ".".join(parts)


@dataclass
class StateDict:
    """The tensors of a state dict under wrapper-free names (what layouts and accounting see)."""

    source: str  # the file (for messages)
    tensors: dict  # wrapper-free key -> tensor or numpy array
    original: dict  # wrapper-free key -> the key in the file
    non_tensor: list  # keys whose values are not arrays
    stripped: list  # wrappers removed: "module.", "_orig_mod."


def unwrap(state: dict, path) -> StateDict:
    """Remove DDP/compile wrappers from the keys of ``state``; refuses keys that then collide."""
    out = StateDict(str(path), {}, {}, [], [])
    stripped = set()
    for k, v in state.items():
        if not is_array(v):
            out.non_tensor.append(k)
            continue
        s = strip_wrappers(k)
        if s != k:
            if k.startswith("module."):
                stripped.add("module.")
            if "_orig_mod" in k.split("."):
                stripped.add("_orig_mod.")
        if s in out.tensors:
            raise HarnessError(f"{path}: keys {out.original[s]!r} and {k!r} collide after removing module./_orig_mod.")
        out.original[s] = k
        out.tensors[s] = v
    out.stripped = sorted(stripped)
    return out
