"""PyTorch -> ONNX on the user's side (``edgepress export``); never run on the server.

The server refuses pickles, TorchScript and ``.pt2`` files because loading them runs code. Users
turn their ``nn.Module`` into ONNX in their own environment with ``export_pytorch`` and upload
the ``.onnx``. The dynamo exporter (``torch.export`` based) is used; the TorchScript-based
exporter is a fallback only when dynamo fails, and a warning says so. The ONNX model is then
run with ONNX Runtime on the example inputs and compared with the PyTorch output.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from service.engine.errors import EngineError

RTOL = 1e-3
ATOL = 1e-4


def _flatten(out: Any) -> list[Any]:
    if isinstance(out, (list, tuple)):
        return [x for o in out for x in _flatten(o)]
    if isinstance(out, dict):
        return [x for o in out.values() for x in _flatten(o)]
    return [out]


def _dynamic_shapes(
    example_inputs: tuple, input_names: list[str], dynamic_axes: dict
) -> tuple | None:
    """Translate ``{input name: {axis: dim name} | [axes]}`` to torch.export dynamic shapes."""
    from torch.export import Dim

    dims: dict[str, Any] = {}
    shapes: list[dict[int, Any] | None] = []
    for name, _ in zip(input_names, example_inputs, strict=False):
        spec = dynamic_axes.get(name)
        if spec is None:
            shapes.append(None)
            continue
        axes = spec if isinstance(spec, dict) else {a: f"{name}_dim{a}" for a in spec}
        shapes.append({
            int(axis): dims.setdefault(str(label), Dim.DYNAMIC) for axis, label in axes.items()
        })
    return tuple(shapes) if any(s is not None for s in shapes) else None


def _name_dynamic_dims(model: Any, dynamic_axes: dict) -> bool:
    """Give dynamic dims the user's names (dynamo names them s0, s1, ...)."""
    changed = False
    for v in list(model.graph.input) + list(model.graph.output):
        spec = dynamic_axes.get(v.name)
        if spec is None:
            continue
        axes = spec if isinstance(spec, dict) else {a: f"{v.name}_dim{a}" for a in spec}
        dims = v.type.tensor_type.shape.dim
        for axis, label in axes.items():
            if int(axis) < len(dims) and not dims[int(axis)].HasField("dim_value"):
                dims[int(axis)].dim_param = str(label)
                changed = True
    return changed


def export_pytorch(
    module: Any,
    example_inputs: tuple,
    path: Path,
    *,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_axes: dict | None = None,
    opset: int = 17,
) -> Path:
    """Export ``module`` to a single self-contained ONNX file at ``path`` and verify it.

    ``dynamic_axes`` maps an input or output name to ``{axis: dim name}`` (or a list of axes),
    as in ``torch.onnx.export``. The exported model is run with ONNX Runtime on
    ``example_inputs`` and must match PyTorch within rtol 1e-3 / atol 1e-4; otherwise
    ``EngineError('export_mismatch')``. ``EngineError('export_failed')`` when both exporters
    fail.
    """
    import onnx
    import onnxruntime as ort
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    example_inputs = tuple(example_inputs)
    names = list(input_names or [f"input_{i}" for i in range(len(example_inputs))])
    with torch.no_grad():
        expected = [t.detach().cpu().numpy() for t in _flatten(module(*example_inputs))]
    out_names = list(output_names or [f"output_{i}" for i in range(len(expected))])

    exporter = "dynamo"
    dynamo_error: Exception | None = None
    try:
        program = torch.onnx.export(
            module, example_inputs, dynamo=True, input_names=names, output_names=out_names,
            opset_version=opset,
            dynamic_shapes=_dynamic_shapes(example_inputs, names, dynamic_axes or {}),
            external_data=False, optimize=True, verify=False, report=False,
        )
        if program is None:
            raise RuntimeError("the dynamo exporter returned no program")
        program.save(str(path), external_data=False)
    except Exception as exc:  # fall back, loudly
        dynamo_error = exc
    if dynamo_error is not None:
        exporter = "torchscript"
        first_line = re.sub(r"\x1b\[[0-9;]*m", "", str(dynamo_error)).strip().split("\n")[0]
        warnings.warn(
            f"the dynamo exporter failed ({type(dynamo_error).__name__}: {first_line[:200]}); "
            "falling back to the TorchScript-based exporter",
            RuntimeWarning,
            stacklevel=2,
        )
        try:
            torch.onnx.export(
                module, example_inputs, str(path), dynamo=False, input_names=names,
                output_names=out_names, opset_version=opset, dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        except Exception as exc:
            raise EngineError("export_failed", "both the dynamo and the TorchScript exporter "
                              f"failed: {type(exc).__name__}: {str(exc)[:300]}") from exc

    model = onnx.load(str(path))
    if dynamic_axes and _name_dynamic_dims(model, dynamic_axes):
        onnx.save_model(model, str(path))
    onnx.checker.check_model(model)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {
        i.name: t.detach().cpu().numpy()
        for i, t in zip(session.get_inputs(), example_inputs, strict=False)
    }
    got = session.run(None, feeds)
    if len(got) != len(expected):
        raise EngineError("export_mismatch", f"the ONNX model has {len(got)} outputs, PyTorch "
                          f"returned {len(expected)} ({exporter} exporter)")
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        if a.shape != np.asarray(b).shape or not np.allclose(a, b, rtol=RTOL, atol=ATOL):
            err = float(np.max(np.abs(a - b))) if a.shape == np.asarray(b).shape else None
            raise EngineError("export_mismatch", f"output {i} of the ONNX model differs from "
                              f"PyTorch ({exporter} exporter)",
                              {"output": i, "max_abs_error": err})
    return path
