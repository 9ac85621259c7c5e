"""The checkpoint format: one ``.npz`` that is enough to sample from and to resume exactly.

Arrays are stored under ``model/<param path>``, ``optimizer/<state path>``, ``ema/<param path>``
(when present); one ``meta`` array holds UTF-8 JSON (uint8)::

    {"format": "mlx-gpt", "version": 1, "config": {...GPTConfig}, "train": {...TrainConfig} | null,
     "vocab": [...chars...], "iter": N, "best_val_loss": x | null, "data_rng": {...} | null,
     "data": {"sha256": ..., "chars": N, "source": ...} | null, "lineage": [[run id, step | null], ...],
     "loss_scale": {"scale": x, "good_steps": N} | null,
     "checksum": "sha256 of every other array"}

``data_rng`` is the training batches' numpy generator; the MLX random key (dropout) is derived from
the seed and the iteration at every step, so there is no MLX RNG state to store. ``data`` fingerprints
the training text (absent in older files); ``loss_scale`` is float16 training's dynamic loss scale (absent in
older files, null for other dtypes).

The container (an npz of float arrays plus a ``meta`` JSON entry with format, version and checksum) is
written by ``container_bytes`` and read by ``read_container``, for this format and the translator's
(``seq2seq/checkpoint.py``). The reader never unpickles, and it checks everything a file declares (the
zip directory, the header's size and nesting, each ``.npy`` header's dtype and shape, their sum against
what the config implies and against the file's size) before it decompresses any array; the values are
then checked for a matching checksum and for NaN/inf. Writes are atomic (``files.write_atomic``).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import numpy as np

from .config import GPTConfig, TrainConfig
from .errors import MlxGptError
from .files import write_atomic
from .tokenizer import CharTokenizer

if TYPE_CHECKING:
    from .model import GPT

FORMAT = "mlx-gpt"
VERSION = 1

# Limits on what a file may declare. Real files stay far below them; they exist so that a small damaged or hostile
# file is refused at once instead of making the reader allocate what it declares.
MAX_META_BYTES = 4 * 2**20  # the JSON header: configs, a vocabulary of MAX_VOCAB_SIZE escaped characters, state
MAX_JSON_DEPTH = 32  # our headers nest 4 deep
MAX_MEMBERS = 100_000  # arrays in one file (a 1000-layer model with optimizer and EMA state holds ~50,000)
MAX_NPY_HEADER = 10_000  # bytes of one .npy header (numpy's own default limit)
# np.savez stores arrays uncompressed and float weights hardly compress, while a zip bomb of zeros expands ~1000x:
# the arrays may declare at most this many times the file's size (plus a little for tiny files).
MAX_EXPANSION = 8
EXPANSION_SLACK = 2**20
# Integer members (e.g. an optimizer's step counter) are scalars; weights are floats.
MAX_INTEGER_ELEMENTS = 16


# ----------------------------------------------------------------------------- reading untrusted files


def _stat_problem(path: Path) -> str | None:
    """Why ``path`` is not a regular file to read, if it is not (a FIFO blocks, /dev/zero never ends)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "is a symlink loop"
        return f"is not readable ({exc.strerror or exc})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a FIFO, device or socket)"
    return None


def open_regular_file(path: str | Path, what: str, hint: str) -> IO[bytes]:
    """``path`` opened for reading; anything but a regular file is one MlxGptError
    ``cannot read {what} {path}: it ...; {hint}``."""
    path = Path(path)
    problem = _stat_problem(path)
    if problem is None:
        try:  # O_NONBLOCK: should the path become a FIFO after the check, opening it still returns at once
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            problem = f"is not readable ({exc.strerror or exc})"
        else:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return os.fdopen(fd, "rb")
            os.close(fd)
            problem = "is not a regular file (a FIFO, device or socket)"
    raise MlxGptError(f"cannot read {what} {path}: it {problem}; {hint}")


def read_limited(path: str | Path, limit: int, what: str, hint: str) -> bytes:
    """The bytes of the regular file ``path``, refused (one line naming ``limit``) when it holds more than ``limit``."""
    with open_regular_file(path, what, hint) as f:
        try:
            payload = f.read(limit + 1)
        except OSError as exc:
            raise MlxGptError(f"cannot read {what} {path}: {exc.strerror or exc}; {hint}") from None
    if len(payload) > limit:
        raise MlxGptError(f"cannot read {what} {path}: it is larger than the limit of {limit:,} bytes; {hint}")
    return payload


_BRACKETS = np.zeros(256, dtype=np.int64)
_BRACKETS[[ord("["), ord("{")]] = 1
_BRACKETS[[ord("]"), ord("}")]] = -1


def json_depth(payload: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest, found without parsing it (brackets outside strings)."""
    codes = np.frombuffer(payload, dtype=np.uint8)
    if not codes.size:
        return 0
    positions = np.arange(codes.size)
    # A quote preceded by an odd run of backslashes is escaped; the others open and close strings.
    last_other = np.maximum.accumulate(np.where(codes == ord("\\"), -1, positions))
    run_before = np.concatenate(([0], positions[:-1] - last_other[:-1]))
    quotes = (codes == ord('"')) & (run_before % 2 == 0)
    steps = np.where(np.cumsum(quotes) % 2 == 1, 0, _BRACKETS[codes])
    return int(np.cumsum(steps).max(initial=0))


def parse_json_limited(payload: bytes, what: str) -> Any:
    """JSON of at most MAX_META_BYTES nesting at most MAX_JSON_DEPTH deep; else an MlxGptError naming the limit."""
    if len(payload) > MAX_META_BYTES:
        raise MlxGptError(f"{what} is {len(payload):,} bytes, more than the limit of {MAX_META_BYTES:,}")
    depth = json_depth(payload)
    if depth > MAX_JSON_DEPTH:
        raise MlxGptError(f"{what} nests {depth} levels deep, more than the limit of {MAX_JSON_DEPTH}")
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):  # ValueError: bad JSON, or an integer of more than 4300 digits
        raise MlxGptError(f"{what} is not valid UTF-8 JSON") from None
    except RecursionError:  # invalid JSON can nest deeper than json_depth counts before the parser fails
        raise MlxGptError(f"{what} nests more than {MAX_JSON_DEPTH} levels deep") from None


# ----------------------------------------------------------------------------- the container


def arrays_checksum(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(_raw_bytes(a))
    return digest.hexdigest()


def _raw_bytes(a: np.ndarray) -> Any:
    """The bytes of a contiguous array, without copying them where numpy allows."""
    try:
        return a.reshape(-1).view(np.uint8)
    except (ValueError, TypeError):  # e.g. object arrays, zero-size dtypes
        return a.tobytes()


def container_bytes(fmt: str, version: int, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """An npz of ``arrays`` plus ``meta`` (with format, version and checksum) as strict JSON."""
    header = {"format": fmt, "version": version, **meta, "checksum": arrays_checksum(arrays)}
    try:
        text = json.dumps(header, allow_nan=False)
    except ValueError:
        raise MlxGptError(f"cannot save a {fmt} file whose header holds NaN or infinity") from None
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, meta=np.frombuffer(text.encode("utf-8"), dtype=np.uint8))
    return buffer.getvalue()


@dataclass(frozen=True)
class Member:
    """What one array of a container declares (its .npy header and zip entry), before anything is read."""

    shape: tuple[int, ...]
    dtype: np.dtype
    file_size: int  # declared uncompressed bytes in the zip, header included

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ContainerKind:
    """One file format built on the container, and how its messages name the file and the fix."""

    format: str
    version: int
    what: str  # "checkpoint", "translator": messages read "{what} {path}: ..."
    missing: str  # what to do when the file does not exist
    fix: str  # what to do when it is damaged
    groups: tuple[str, ...]  # the arrays' name prefixes ("model" for model/...)
    integer_members: frozenset[str] = frozenset()  # scalars allowed to be integers; every other array is float


T = TypeVar("T")
# Checks a parsed header against the members' declarations; returns what the format builds from the header.
HeaderCheck = Callable[[dict[str, Any], dict[str, Member]], T]


class _Refused(Exception):
    """A problem with the file; read_container prefixes the file's name."""


def read_container(path: str | Path, kind: ContainerKind, check: HeaderCheck) -> tuple[T, dict[str, np.ndarray]]:
    """``(check(meta, members), arrays)`` of a container file; any problem is one MlxGptError naming the file."""
    path = Path(path)
    problem = _stat_problem(path)
    if problem == "does not exist":
        raise MlxGptError(f"{kind.what} {path} does not exist; {kind.missing}")
    with open_regular_file(path, kind.what, kind.fix) as f:
        try:
            return _read_open_container(f, kind, check)
        except (_Refused, MlxGptError) as exc:
            raise MlxGptError(f"{kind.what} {path}: {exc}") from None
        except MemoryError:
            raise MlxGptError(f"{kind.what} {path} needs more memory than is free to load; free some memory "
                              "or load it on a larger machine") from None


def read_header(path: str | Path, kind: ContainerKind) -> dict[str, Any]:
    """The parsed JSON header of a container file alone (bounded as ``read_container`` bounds it), without reading
    its arrays; any problem is one MlxGptError naming the file."""
    path = Path(path)
    with open_regular_file(path, kind.what, kind.fix) as f:
        try:
            with zipfile.ZipFile(f) as archive:
                return _read_meta(archive, kind)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            raise MlxGptError(f"{kind.what} {path}: not an .npz file ({_reason(exc)})") from None
        except (_Refused, KeyError) as exc:
            raise MlxGptError(f"{kind.what} {path}: {exc}") from None


def _read_open_container(f: IO[bytes], kind: ContainerKind, check: HeaderCheck) -> tuple[T, dict[str, np.ndarray]]:
    file_bytes = os.fstat(f.fileno()).st_size
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise _Refused(f"not an .npz file (no readable zip archive: {_reason(exc)}); {kind.fix}") from None
    with archive:
        names = _member_names(archive, kind)
        meta = _read_meta(archive, kind)
        members = {name: _member(archive, name, kind) for name in names if name != "meta"}
        try:
            built = check(meta, members)
        except MlxGptError as exc:
            raise _Refused(f"{exc}; {kind.fix}") from None
        _check_sizes(members, file_bytes, kind)
        arrays = {name: _read_array(archive, name, kind) for name in members}
    if meta.get("checksum") != arrays_checksum(arrays):
        raise _Refused(f"checksum mismatch: the file is corrupt; {kind.fix}")
    _check_finite(arrays, kind)
    return built, arrays


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _member_names(archive: zipfile.ZipFile, kind: ContainerKind) -> list[str]:
    """The arrays' names (npz member names without ``.npy``), after checking the zip directory."""
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise _Refused(f"it holds {len(infos):,} entries, more than the limit of {MAX_MEMBERS:,}; {kind.fix}")
    names = [info.filename.removesuffix(".npy") for info in infos]
    if any(not info.filename.endswith(".npy") for info in infos):
        raise _Refused(f"not an .npz of arrays (it holds files other than .npy); {kind.fix}")
    if len(set(names)) != len(names):
        raise _Refused(f"it holds an array name twice: the file is corrupt; {kind.fix}")
    if "meta" not in names:
        raise _Refused(f"no {kind.format} header ('meta' entry): not an {kind.format} {kind.what}; {kind.fix}")
    stray = [n for n in names if n != "meta" and ("/" not in n or n.split("/", 1)[0] not in kind.groups)]
    if stray:
        groups = ", ".join(f"{g}/" for g in kind.groups)
        raise _Refused(f"unexpected entries {name_list(sorted(stray), 4)} (an {kind.format} {kind.what} holds "
                       f"only meta and {groups}); {kind.fix}")
    return names


def _npy_header(archive: zipfile.ZipFile, name: str, kind: ContainerKind) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) from the first bytes of a member; nothing else is decompressed."""
    try:
        with archive.open(f"{name}.npy") as fp:
            version = np.lib.format.read_magic(fp)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran_order, dtype = read[version](fp, max_header_size=MAX_NPY_HEADER)
            return tuple(shape), dtype, fp.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as exc:
        raise _Refused(f"{name} is not a readable .npy array ({_reason(exc)}); {kind.fix}") from None


def _member(archive: zipfile.ZipFile, name: str, kind: ContainerKind) -> Member:
    shape, dtype, header = _npy_header(archive, name, kind)
    member = Member(shape, dtype, archive.getinfo(f"{name}.npy").file_size)
    if dtype.hasobject:
        raise _Refused(f"{name} holds pickled Python objects, which are never loaded; {kind.fix}")
    allowed = "fiu" if name in kind.integer_members else "f"
    if dtype.kind not in allowed or (dtype.kind != "f" and member.size > MAX_INTEGER_ELEMENTS):
        want = "float or integer scalars" if name in kind.integer_members else "floats"
        raise _Refused(f"{name} has dtype {dtype} but must hold {want}; {kind.fix}")
    if member.file_size != header + member.size * dtype.itemsize:
        raise _Refused(f"{name} declares {member.file_size:,} bytes but its shape {shape} of {dtype} needs "
                       f"{header + member.size * dtype.itemsize:,}: the file is corrupt; {kind.fix}")
    return member


def _read_meta(archive: zipfile.ZipFile, kind: ContainerKind) -> dict[str, Any]:
    """The parsed JSON header, bounded in size and depth; its format and version checked."""
    shape, dtype, header = _npy_header(archive, "meta", kind)
    if dtype != np.uint8 or len(shape) != 1:
        raise _Refused(f"its 'meta' entry is not UTF-8 bytes: not an {kind.format} {kind.what}; {kind.fix}")
    if shape[0] > MAX_META_BYTES:
        raise _Refused(f"its header is {shape[0]:,} bytes, more than the limit of {MAX_META_BYTES:,}; {kind.fix}")
    payload = _read_array(archive, "meta", kind).tobytes()
    try:
        meta = parse_json_limited(payload, "its header")
    except MlxGptError as exc:
        raise _Refused(f"{exc}: the file is corrupt; {kind.fix}") from None
    if not isinstance(meta, dict) or meta.get("format") != kind.format:
        raise _Refused(f"not an {kind.format} {kind.what} (foreign 'format' in its header); {kind.fix}")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _Refused(f"invalid format version {version!r}: the header is corrupt; {kind.fix}")
    if version > kind.version:
        raise _Refused(f"written by a newer mlx-gpt (format version {version}, this one reads <= {kind.version}); "
                       "upgrade mlx-gpt")
    return meta


def _check_sizes(members: dict[str, Member], file_bytes: int, kind: ContainerKind) -> None:
    """The arrays together may not declare more than the file can hold (a zip bomb declares far more)."""
    declared = sum(m.file_size for m in members.values())
    if declared > MAX_EXPANSION * file_bytes + EXPANSION_SLACK:
        raise _Refused(f"its arrays declare {declared:,} bytes, more than {MAX_EXPANSION} times the file's "
                       f"{file_bytes:,} (a zip bomb?); {kind.fix}")


def _read_array(archive: zipfile.ZipFile, name: str, kind: ContainerKind) -> np.ndarray:
    try:
        with archive.open(f"{name}.npy") as fp:
            return np.lib.format.read_array(fp, allow_pickle=False, max_header_size=MAX_NPY_HEADER)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as exc:
        raise _Refused(f"not a readable .npz (truncated or corrupt?: {_reason(exc)}); {kind.fix}") from None


def _check_finite(arrays: dict[str, np.ndarray], kind: ContainerKind, chunk: int = 2**20) -> None:
    for name, array in arrays.items():
        flat = array.reshape(-1)
        if array.dtype.kind == "f" and not all(np.isfinite(flat[i:i + chunk]).all()
                                               for i in range(0, flat.size, chunk)):
            what = "weights" if name.split("/", 1)[0] in ("model", "ema") else "values"
            raise _Refused(f"non-finite {what} in {name}: the {kind.what} is damaged; {kind.fix}")


# ----------------------------------------------------------------------------- checks shared by the formats


def name_list(names: list[str], limit: int = 8) -> str:
    """The first ``limit`` names, comma-separated, with how many more there are."""
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def group(members: dict[str, Member], prefix: str) -> dict[str, Member]:
    """The members named ``prefix/...``, by the rest of their names."""
    start = len(prefix) + 1
    return {k[start:]: v for k, v in members.items() if k.startswith(prefix + "/")}


def param_bounds(config: GPTConfig) -> tuple[int, int]:
    """(fewest, most) parameters a model of this shape can have, whatever its biases and head (no model is built)."""
    V, L, C = config.vocab_size, config.n_layer, config.n_embd
    T = config.block_size if config.position_encoding == "learned" else 0  # rotary positions have no weights
    fewest = (V + T) * C + L * 12 * C * C  # embeddings and the layers' matrices
    # an untied head with bias, norms, biases, and the shortcuts' mixing weights (3 per layer)
    return fewest, fewest + V * C + V + 2 * C + L * (13 * C + 3)


def check_param_count(members: dict[str, Member], what: str, bounds: tuple[int, int]) -> None:
    """The arrays ``what`` must hold as many values as the config implies: a header cannot ask for more."""
    count = sum(m.size for m in members.values())
    if not bounds[0] <= count <= bounds[1]:
        raise MlxGptError(f"its {what} hold {count:,} values but its config implies {bounds[0]:,} to {bounds[1]:,}; "
                          "the header is corrupt")


def layer_mismatch(shapes: dict[str, tuple[int, ...]], prefix: str, n_layer: int) -> str | None:
    """How the layers named ``{prefix}N.`` disagree with ``n_layer``, if they do (never ranges over n_layer)."""
    layers = {name[len(prefix):].split(".", 1)[0] for name in shapes if name.startswith(prefix)}
    if len(layers) == n_layer and all(i.isdigit() and int(i) < n_layer for i in layers):
        return None
    missing = [f"{prefix}{i}." for i in range(min(n_layer, len(layers) + 3)) if str(i) not in layers]
    return (f"n_layer is {n_layer} but the weights hold {len(layers)} {prefix}N layers"
            + (f": missing {', '.join(missing)}" if missing else ""))


def shape_mismatch(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str | None:
    for name, shape in expected.items():
        if name not in shapes:
            return f"no {name}"
        if tuple(shapes[name]) != shape:
            return f"{name} has shape {tuple(shapes[name])}, the config implies {shape}"
    return None


def array_mismatches(expected: dict[str, tuple[int, ...]], arrays: dict[str, Any]) -> list[str]:
    """What keeps ``arrays`` from having exactly the expected names and shapes: missing, unexpected, wrong shape."""
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    wrong = sorted(k for k in set(expected) & set(arrays) if tuple(arrays[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"missing keys: {name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {name_list(unexpected)}")
    if wrong:
        shapes = [f"{k} {tuple(arrays[k].shape)} (expected {expected[k]})" for k in wrong]
        problems.append(f"wrong shapes: {name_list(shapes, 3)}")
    return problems


def check_arrays(
    path: Path | None, what: str, expected: dict[str, tuple[int, ...]], weights: dict[str, np.ndarray]
) -> None:
    """Raise an MlxGptError unless ``weights`` has exactly the expected names and shapes (and numeric dtypes)."""
    problems = array_mismatches(expected, weights)
    not_numeric = sorted(k for k in weights if weights[k].dtype.kind not in "fiub")
    if not_numeric:
        problems.append(f"non-numeric dtype in {name_list(not_numeric, 3)}")
    if problems:
        raise MlxGptError(f"checkpoint {path}: {what} do not match its config: {'; '.join(problems)}")


# ----------------------------------------------------------------------------- the GPT checkpoint

KIND = ContainerKind(
    FORMAT, VERSION, "checkpoint",
    missing="train one first (python train.py) or pass --ckpt PATH",
    fix="use another checkpoint (e.g. a timestamped one) with --ckpt",
    groups=("model", "optimizer", "ema"),
    # the step counters of AdamW, and of each part of Muon with AdamW (training/muon.py)
    integer_members=frozenset({"optimizer/step", "optimizer/muon.step", "optimizer/adamw.step"}),
)
TRAIN_FIELDS = frozenset(f.name for f in fields(TrainConfig))


def _prefixed(prefix: str, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}/{k}": v for k, v in flat.items()}


def _strip(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in arrays.items() if k.startswith(prefix + "/")}


def _optional_dict(meta: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = meta.get(key)
    if value is not None and not isinstance(value, dict):
        raise MlxGptError(f"'{key}' must be an object or null, got {type(value).__name__}")
    return value


def _lineage(meta: dict[str, Any]) -> list[list[Any]]:
    lineage = meta.get("lineage", [])
    if not isinstance(lineage, list) or not all(
            isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
            and (entry[1] is None or (isinstance(entry[1], int) and not isinstance(entry[1], bool)))
            for entry in lineage):
        raise MlxGptError("'lineage' must be a list of [run id, step or null]")
    return lineage


def _loss_scale(meta: dict[str, Any]) -> dict[str, Any] | None:
    value = meta.get("loss_scale")
    if value is None:
        return None
    if not (isinstance(value, dict) and set(value) == {"scale", "good_steps"}
            and isinstance(value["scale"], (int, float)) and not isinstance(value["scale"], bool)
            and math.isfinite(value["scale"]) and value["scale"] > 0
            and isinstance(value["good_steps"], int) and not isinstance(value["good_steps"], bool)
            and 0 <= value["good_steps"] < 2**31):
        raise MlxGptError("'loss_scale' must be null or {\"scale\": a positive number, "
                          "\"good_steps\": an integer >= 0}")
    return value


def _header_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """The Checkpoint fields the JSON header holds, validated."""
    config = GPTConfig.from_dict(meta.get("config"))
    tokenizer = CharTokenizer(meta.get("vocab") or [])
    train = _optional_dict(meta, "train")
    unknown = sorted(set(train or {}) - TRAIN_FIELDS)
    if unknown:
        raise MlxGptError(f"'train' has keys that are not TrainConfig fields: {name_list(unknown, 5)}")
    iteration = meta.get("iter", 0)
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        raise MlxGptError(f"'iter' must be a non-negative integer, got {iteration!r}")
    best = meta.get("best_val_loss")
    if best is not None and (not isinstance(best, (int, float)) or isinstance(best, bool) or not math.isfinite(best)):
        raise MlxGptError(f"'best_val_loss' must be a finite number or null, got {best!r}")
    seconds = meta.get("train_seconds", 0.0)  # absent before it was recorded
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < math.inf:
        raise MlxGptError(f"'train_seconds' must be a finite number >= 0, got {seconds!r}")
    return {"config": config, "tokenizer": tokenizer, "train": train, "iter": iteration, "best_val_loss": best,
            "data_rng": _optional_dict(meta, "data_rng"), "data": _optional_dict(meta, "data"),
            "lineage": _lineage(meta), "train_seconds": float(seconds), "loss_scale": _loss_scale(meta)}


def _check_gpt_header(meta: dict[str, Any], members: dict[str, Member]) -> dict[str, Any]:
    try:
        header = _header_fields(meta)
    except MlxGptError as exc:
        raise MlxGptError(f"bad header: {exc}") from None
    config, tokenizer = header["config"], header["tokenizer"]
    if tokenizer.vocab_size != config.vocab_size:
        raise MlxGptError(f"vocabulary has {tokenizer.vocab_size} characters but config.vocab_size is "
                          f"{config.vocab_size}")
    model = group(members, "model")
    if not model:
        raise MlxGptError("holds no model weights")
    # The header is not covered by the checksum: it must describe these weights before anything builds a model
    # from it (a header asking for 10**9 layers would otherwise exhaust memory).
    mismatch = _config_mismatch(config, {k: m.shape for k, m in model.items()})
    if mismatch:
        raise MlxGptError(f"its config does not match its weights ({mismatch}); the header is corrupt")
    bounds = param_bounds(config)
    check_param_count(model, "model weights", bounds)
    if group(members, "ema"):
        check_param_count(group(members, "ema"), "EMA weights", bounds)
    # AdamW: two moments per parameter (Muon: one), plus scalars (steps, learning rates, momentum)
    check_param_count(group(members, "optimizer"), "optimizer state", (0, 2 * bounds[1] + MAX_INTEGER_ELEMENTS))
    return header


def _config_mismatch(config: GPTConfig, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What in ``config`` disagrees with the sizes the weights declare (embeddings, layer count), if anything."""
    expected = {"wte.weight": (config.vocab_size, config.n_embd)}
    if config.position_encoding == "learned":
        expected["wpe.weight"] = (config.block_size, config.n_embd)
    mismatch = shape_mismatch(shapes, expected) or layer_mismatch(shapes, "h.", config.n_layer)
    return mismatch and mismatch.replace("n_layer is", "config.n_layer is")


@dataclass
class Checkpoint:
    """What a checkpoint holds. Flat dicts map dotted parameter/state paths to numpy arrays."""

    config: GPTConfig
    tokenizer: CharTokenizer
    model: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    ema: dict[str, np.ndarray] = field(default_factory=dict)
    train: dict[str, Any] | None = None
    iter: int = 0
    best_val_loss: float | None = None
    data_rng: dict[str, Any] | None = None
    data: dict[str, Any] | None = None  # fingerprint of the training text: {"sha256", "chars", "source"}
    lineage: list[list[Any]] = field(default_factory=list)  # [[run id, last step taken from it or None], ...]
    train_seconds: float = 0.0  # wall time spent training up to this step (evaluation and saving left out)
    loss_scale: dict[str, Any] | None = None  # float16 training's {"scale", "good_steps"} (absent in older files)
    path: Path | None = None

    def to_bytes(self) -> bytes:
        arrays = {**_prefixed("model", self.model), **_prefixed("optimizer", self.optimizer),
                  **_prefixed("ema", self.ema)}
        meta = {"config": self.config.to_dict(), "train": self.train, "vocab": self.tokenizer.chars,
                "iter": self.iter, "best_val_loss": self.best_val_loss, "data_rng": self.data_rng,
                "data": self.data, "lineage": self.lineage, "train_seconds": self.train_seconds}
        if self.loss_scale is not None:  # float16 runs only: other files stay as they were
            meta["loss_scale"] = self.loss_scale
        return container_bytes(FORMAT, VERSION, meta, arrays)

    def save(self, path: str | Path) -> Path:
        """Write atomically to ``path``."""
        path = Path(path)
        write_atomic(path, self.to_bytes())
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """Read and validate a checkpoint; any problem is one MlxGptError naming the file."""
        path = Path(path)
        header, arrays = read_container(path, KIND, _check_gpt_header)
        return cls(model=_strip("model", arrays), optimizer=_strip("optimizer", arrays), ema=_strip("ema", arrays),
                   path=path, **header)


def load_model(path: str | Path, weights: str = "auto", dtype: str = "float32") -> tuple[GPT, CharTokenizer,
                                                                                         Checkpoint]:
    """A ready-to-sample model (eval mode) and its tokenizer from a checkpoint.

    ``weights``: "auto" uses the EMA weights when the checkpoint has them, "raw" the trained
    weights, "ema" insists on EMA weights. ``dtype``: the weights cast to it (float32, bfloat16, float16).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .model import GPT
    from .precision import cast_floats, mlx_dtype

    if weights not in ("auto", "raw", "ema"):
        raise MlxGptError(f"weights must be auto, raw or ema, got {weights!r}")
    compute_dtype = mlx_dtype(dtype)
    ckpt = Checkpoint.load(path)
    if weights == "ema" and not ckpt.ema:
        raise MlxGptError(f"checkpoint {ckpt.path} has no EMA weights; use --weights raw")
    chosen = ckpt.ema if ckpt.ema and weights != "raw" else ckpt.model
    model = GPT(ckpt.config)
    check_arrays(ckpt.path, "weights", {k: v.shape for k, v in tree_flatten(model.parameters())}, chosen)
    model.load_weights([(k, mx.array(v)) for k, v in chosen.items()])
    if compute_dtype != mx.float32:
        model.update(cast_floats(model.parameters(), compute_dtype))
    model.eval()
    mx.eval(model.parameters())
    return model, ckpt.tokenizer, ckpt
