"""User-side PyTorch export: dynamo exporter, dynamic axes kept and named, checked against torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from service.engine.errors import EngineError
from service.engine.export import export_pytorch
from service.engine.ingest import inspect_upload


class _Tagger(torch.nn.Module):
    """Embedding -> Linear per token: dynamic batch and sequence."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


def test_export_keeps_named_dynamic_axes_and_matches_torch(tmp_path: Path) -> None:
    module = _Tagger()
    path = export_pytorch(module, (torch.randint(0, 50, (2, 7)),), tmp_path / "m.onnx",
                          input_names=["ids"], output_names=["tags"],
                          dynamic_axes={"ids": {0: "batch", 1: "seq"},
                                        "tags": {0: "batch", 1: "seq"}})
    model = onnx.load(str(path))
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    # Another batch and sequence length than the example: still matches PyTorch.
    ids = torch.randint(0, 50, (3, 11))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"ids": ids.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, module(ids).numpy(), rtol=1e-4, atol=1e-5)
    # What the user uploads is accepted by the server-side ingest.
    desc = inspect_upload(path)
    assert desc["inputs"][0]["shape"] == ["batch", "seq"]
    assert desc["external_data"] is False


def test_export_detects_a_model_that_does_not_match(tmp_path: Path) -> None:
    class Random(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.rand_like(x)  # different on every run: cannot match

    with pytest.raises(EngineError) as info:
        export_pytorch(Random(), (torch.zeros(2, 8),), tmp_path / "r.onnx")
    assert info.value.code == "export_mismatch"


@pytest.mark.slow
def test_falls_back_to_torchscript_when_dynamo_fails_and_says_so(tmp_path: Path) -> None:
    class DataDependent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum().item() > 0:  # torch.export cannot trace this; tracing keeps one branch
                return self.lin(x)
            return -self.lin(x)

    with pytest.warns(RuntimeWarning, match="falling back to the TorchScript-based exporter"):
        path = export_pytorch(DataDependent(), (torch.ones(2, 8),), tmp_path / "d.onnx")
    assert inspect_upload(path)["node_count"] >= 1
