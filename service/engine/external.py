"""Weights kept in external data files: read one tensor at a time, written appended, saved.

A model past what the engine inlines (``EngineLimits.external_data_inline_bytes``, and always
past 2 GiB, the most one protobuf holds) is held in memory as its graph only: each large
initializer is ``data_location = EXTERNAL`` with ``location`` (relative), ``offset``,
``length`` and ``basepath``, the absolute folder ``location`` is read from. ``basepath`` is
only ever set by the engine itself: ingest sets it after it has verified the upload's files
(``service.engine.ingest.external_data``: confined, no links, offsets and lengths checked) and
drops whatever the upload said; a pass that streams writes its tensors with an
``ExternalWriter`` under its own workdir. onnx's checker accepts the key, and ``save`` writes
a model whose files ONNX Runtime opens from the path (``basepath`` removed, every location
relative to the saved file).

``read_tensor`` maps a tensor's bytes (``np.memmap``, read only): the page cache holds them,
not the process's heap, and one tensor at a time is what a streaming pass keeps alive.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BASEPATH = "basepath"
ALIGN = 4096  # tensors start on a page: ONNX Runtime can map them in place


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def external_source(t: TensorProto) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor the engine set up (``basepath`` known)."""
    info = {e.key: e.value for e in t.external_data}
    if BASEPATH not in info:
        raise ValueError(f"tensor {t.name!r} has external data the engine did not verify")
    return (Path(info[BASEPATH]) / info["location"], int(info.get("offset", "0")),
            int(info["length"]))


def initializers(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every initializer of the main graph and of If/Loop/Scan bodies (ingest keeps only the
    main graph's external; a pass may write any)."""
    from service.engine.graph import iter_graphs

    for graph, _ in iter_graphs(model.graph):
        yield from graph.initializer


def has_external(model: onnx.ModelProto) -> bool:
    """Whether some weight of ``model`` stays in an external data file."""
    return any(is_external(t) for t in initializers(model))


def checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as onnx's checker can take it in memory: the checker looks for an external
    tensor's file relative to the process's working directory (it ignores ``basepath``), so
    the copy declares each external main-graph initializer as a graph input of the same type
    and shape instead. Their storage was verified by ingest or written by the engine."""
    if not any(is_external(t) for t in model.graph.initializer):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [t for t in out.graph.initializer if not is_external(t)]
    moved = [t for t in out.graph.initializer if is_external(t)]
    declared = {i.name for i in out.graph.input}
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    out.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                           for t in moved if t.name not in declared)
    return out


def read_tensor(t: TensorProto) -> np.ndarray:
    """The values of ``t``: mapped read-only from its file when external, else decoded."""
    if not is_external(t):
        return numpy_helper.to_array(t)
    path, offset, length = external_source(t)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    shape = tuple(int(d) for d in t.dims)
    if length == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def external_bytes(model: onnx.ModelProto) -> int:
    """Bytes of ``model``'s weights held in external files."""
    return sum(external_source(t)[2] for t in initializers(model) if is_external(t))


def point_at(t: TensorProto, folder: Path, location: str, offset: int, length: int) -> None:
    """Make ``t`` an external tensor read from ``folder / location`` at ``offset``."""
    t.ClearField("raw_data")
    for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                 "string_data"):
        t.ClearField(name)  # type: ignore[arg-type]
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(length)), (BASEPATH, str(folder))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


class ExternalWriter:
    """Appends tensors to one data file (``path``); each ``add`` returns an external tensor
    that reads its bytes from there. Open it as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "xb")  # noqa: SIM115 - closed by close()/__exit__
        self.bytes = 0

    def __enter__(self) -> ExternalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def add(self, array: np.ndarray, name: str, data_type: int | None = None,
            dims: list[int] | None = None) -> TensorProto:
        """``array`` appended (page-aligned), as tensor ``name`` (``data_type``: the ONNX type
        when it is not the array's own, e.g. UINT4 codes already packed two to a byte, with
        ``dims`` the tensor's own shape)."""
        array = np.ascontiguousarray(array)
        offset = -(-self.bytes // ALIGN) * ALIGN
        if offset > self.bytes:
            self._file.write(b"\0" * (offset - self.bytes))
        data = array.tobytes()
        self._file.write(data)
        self.bytes = offset + len(data)
        t = TensorProto(name=name, data_type=data_type or helper.np_dtype_to_tensor_dtype(
            array.dtype), dims=list(array.shape) if dims is None else list(dims))
        point_at(t, self.path.parent, self.path.name, offset, len(data))
        return t


def save(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write ``model`` (with external tensors) to ``path``; returns the files written or
    referenced. A tensor whose file lies below ``path``'s folder is referenced where it is;
    any other is copied into ``<name>.data`` next to ``path``. ``model`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    external = [t for t in initializers(out) if is_external(t)]
    kept = {external_source(t)[0].resolve() for t in external}
    kept = {f for f in kept if f.is_relative_to(folder)}
    data_path = path.with_name(path.name + ".data")
    while data_path.resolve() in kept:  # never overwrite a file the model reads from
        data_path = data_path.with_name(data_path.name + "_")
    files: set[Path] = {path}
    written = 0
    sink = None
    try:
        for t in external:
            source, offset, length = external_source(t)
            source = source.resolve()
            if source in kept:
                location = source.relative_to(folder).as_posix()
                files.add(source)
                del t.external_data[:]
                _entries(t, location, offset, length)
                continue
            if sink is None:
                data_path.unlink(missing_ok=True)
                sink = open(data_path, "wb")  # noqa: SIM115 - closed below
            start = -(-written // ALIGN) * ALIGN
            sink.write(b"\0" * (start - written))
            with open(source, "rb") as src:
                src.seek(offset)
                _copy(src, sink, length)
            written = start + length
            del t.external_data[:]
            _entries(t, data_path.name, start, length)
            files.add(data_path)
    finally:
        if sink is not None:
            sink.close()
    onnx.save_model(out, str(path))
    return sorted(files)


def _entries(t: TensorProto, location: str, offset: int, length: int) -> None:
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def _copy(src: object, dst: object, length: int) -> None:
    left = length
    while left > 0:
        chunk = src.read(min(left, 16 << 20))  # type: ignore[attr-defined]
        if not chunk:
            raise OSError("external data file ended early")
        dst.write(chunk)  # type: ignore[attr-defined]
        left -= len(chunk)


# The session setting for a model whose float MatMul/Gemm weights stay in external data
# (``float_weights_on_disk``): prepacking would copy them all into memory.
NO_PREPACKING = ("session.disable_prepacking", "1")
GRAPH_ONLY_BYTES = 64 << 20  # a saved .onnx this small can be parsed to look at its weights
SHARE_ALIGN = 64  # a shared tensor starts on a cache line (our files align to ALIGN)


class _Layout(NamedTuple):
    """What ``make_session`` asks of a saved model's external weights (``_layout``)."""

    float_weights_on_disk: bool
    # (name, data file, offset, dtype, shape) of each main-graph external tensor that can be
    # viewed from a shared mapping (``shared_initializers``)
    views: tuple[tuple[str, Path, int, np.dtype, tuple[int, ...]], ...]
    # bytes of the main graph's weights held in external data files
    external_bytes: int = 0


_NO_LAYOUT = _Layout(False, ())


def _layout_of(path: Path) -> _Layout:
    """``_layout`` of the saved model at ``path``, parsed once per file version (path, size,
    modification time): every ONNX Runtime session the engine makes asks, an auto job dozens
    of times for the same few files. A file past ``GRAPH_ONLY_BYTES`` holds its weights
    itself and is not parsed."""
    try:
        stat = Path(path).stat()
    except OSError:  # not ours to judge here: the session reports it
        return _NO_LAYOUT
    if stat.st_size > GRAPH_ONLY_BYTES:
        return _NO_LAYOUT
    return _layout(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _layout(path: str, size: int, mtime_ns: int) -> _Layout:
    """``_layout_of`` for one version of a file (``size``, ``mtime_ns``: the key)."""
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # not ours to judge here: the session reports it
        return _NO_LAYOUT
    external = {t.name for t in model.graph.initializer
                if is_external(t) and t.data_type == TensorProto.FLOAT}
    on_disk = any(n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in external
                  for n in model.graph.node)
    folder = Path(path).parent.resolve()
    views = []
    total = 0
    for t in model.graph.initializer:
        if not is_external(t):
            continue
        info = {e.key: e.value for e in t.external_data}
        with contextlib.suppress(ValueError):
            total += max(0, int(info.get("length", "0")))
        file = (folder / info.get("location", "")).resolve()
        if not file.is_relative_to(folder) or file == folder:  # as ONNX Runtime confines it
            continue
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        except (KeyError, TypeError, ValueError):
            continue
        offset, length = int(info.get("offset", "0")), int(info.get("length", "-1"))
        shape = tuple(int(d) for d in t.dims)
        count = int(np.prod(shape, dtype=np.int64))
        if (dtype.kind not in "fiub" or dtype.itemsize not in (1, 2, 4, 8) or offset % SHARE_ALIGN
                or length != count * dtype.itemsize or count == 0):
            continue
        views.append((t.name, file, offset, dtype, shape))
    return _Layout(on_disk, tuple(views), total)


def external_weight_bytes(path: Path) -> int:
    """Bytes of the main graph's weights the saved model at ``path`` keeps in external data
    files, as its entries declare them (parsed once per file version, ``_layout_of``; 0 for a
    file that holds its weights itself)."""
    return _layout_of(path).external_bytes


def float_weights_on_disk(path: Path) -> bool:
    """Whether the model saved at ``path`` reads float MatMul/Gemm weights from external data
    files (parsed once per file version, ``_layout_of``)."""
    return _layout_of(path).float_weights_on_disk


def saved_bytes(path: Path) -> int:
    """Bytes of a saved model: its file and every external data file it names."""
    model = onnx.load(str(path), load_external_data=False)
    folder = Path(path).parent
    files = {Path(path).resolve()}
    for t in initializers(model):
        if is_external(t):
            info = {e.key: e.value for e in t.external_data}
            files.add((folder / info["location"]).resolve())
    return sum(f.stat().st_size for f in files)


# One read-only mapping per external data file (and version) in this process, shared by every
# session that reads it; gone when the last session holding a view of it is.
_MAPPED: weakref.WeakValueDictionary[tuple[str, int, int], np.memmap] = (
    weakref.WeakValueDictionary())


def shared_initializers(path: Path) -> list[tuple[str, object]]:
    """(name, ``OrtValue``) for each main-graph initializer the saved model at ``path`` reads
    from an external data file, viewing one read-only mapping of that file: to hand to every
    ONNX Runtime session of the model (``SessionOptions.add_initializer``).

    ONNX Runtime maps a model's external data once per session, privately and writable: a
    job's few sessions of one model (fidelity, placebo, one per thread count) held as many
    copies in its resident set, each charged to its data limit (``RLIMIT_DATA``) whether
    touched or not. A shared, read-only mapping is held once and is page cache, which the
    kernel can reclaim. Tensors numpy cannot view (4-bit, bfloat16, float8 types, an offset off
    ``SHARE_ALIGN``) and If/Loop/Scan body weights are left to ONNX Runtime. Empty when the
    model keeps no weight outside its file (or a file a larger model would not be parsed).
    The caller keeps the returned values alive as long as its session (they hold the
    mapping)."""
    views = _layout_of(path).views
    if not views:
        return []
    import onnxruntime as ort

    out: list[tuple[str, object]] = []
    for name, file, offset, dtype, shape in views:
        length = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        mapped = _mapping(file)
        if mapped is None or offset + length > mapped.size:
            continue
        view = mapped[offset:offset + length].view(dtype).reshape(shape)
        out.append((name, ort.OrtValue.ortvalue_from_numpy(view)))
    return out


def drop_resident_pages(path: Path) -> None:
    """Let go of this process's resident pages of the shared mappings the saved model at
    ``path`` reads its weights from (``madvise(MADV_DONTNEED)``): called once a session has
    copied what it prepacks (int4/int8 MatMul weights, repacked at load), whose file pages it
    then no longer reads. Clean file pages only: whatever a session still reads is faulted in
    again from the page cache, the same bytes."""
    import mmap

    for file in {view[1] for view in _layout_of(path).views}:
        try:
            stat = file.stat()
        except OSError:
            continue
        mapped = _MAPPED.get((str(file), stat.st_size, stat.st_mtime_ns))
        raw = getattr(mapped, "_mmap", None)
        if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError, ValueError):  # advice only
                raw.madvise(mmap.MADV_DONTNEED)


@contextlib.contextmanager
def pages_released(path: Path, interval: float = 0.005) -> Iterator[None]:
    """While the block runs, let go of this process's resident pages of the model's shared
    weight mappings every ``interval`` seconds (``drop_resident_pages``), and once at the end.
    For making an ONNX Runtime session that prepacks: it reads each weight once to copy it
    (and releases the GIL meanwhile), so without this the file pages it has read stay
    resident beside the copies until it returns: the whole int4 model twice at the peak."""
    import threading

    done = threading.Event()

    def loop() -> None:
        while not done.wait(interval):
            drop_resident_pages(path)

    worker = threading.Thread(target=loop, name="edgepress-release-pages", daemon=True)
    worker.start()
    try:
        yield
    finally:
        done.set()
        worker.join()
        drop_resident_pages(path)


def tensor_views(path: Path, names: set[str]) -> list[tuple[str, object]]:
    """(name, ``OrtValue``) for the tensors ``names`` of the saved model at ``path`` that
    ``shared_initializers`` would view, each from a read-only mapping of its own bytes only:
    held, and let go, with the values (``segments.SegmentedSession``: one segment's weights
    resident at a time)."""
    views = [v for v in _layout_of(path).views if v[0] in names]
    if not views:
        return []
    import onnxruntime as ort

    out: list[tuple[str, object]] = []
    for name, file, offset, dtype, shape in views:
        try:
            mapped = np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape)
        except (OSError, ValueError):  # left to ONNX Runtime to read, or to report
            continue
        out.append((name, ort.OrtValue.ortvalue_from_numpy(mapped)))
    return out


def _mapping(file: Path) -> np.memmap | None:
    """This process's read-only mapping of ``file`` (one per file version), None when the file
    cannot be mapped."""
    try:
        stat = file.stat()
    except OSError:
        return None
    key = (str(file), stat.st_size, stat.st_mtime_ns)
    mapped = _MAPPED.get(key)
    if mapped is None:
        if stat.st_size == 0:
            return None
        mapped = np.memmap(file, dtype=np.uint8, mode="r")
        _MAPPED[key] = mapped
    return mapped
