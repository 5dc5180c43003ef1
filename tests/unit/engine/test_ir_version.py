"""Models stamped with a newer IR version than the runtime loads are lowered when safe."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.engine.ingest import RUNTIME_MAX_IR_VERSION, fit_ir_version


def relu_model(ir: int, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", dtype, [1, 4])],
                              [helper.make_tensor_value_info("y", dtype, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ir
    return model


def loads(model: onnx.ModelProto) -> bool:
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


def test_constant_matches_installed_runtime() -> None:
    assert loads(relu_model(RUNTIME_MAX_IR_VERSION))
    assert not loads(relu_model(RUNTIME_MAX_IR_VERSION + 1))


def test_new_ir_with_old_opset_is_lowered_and_loads() -> None:
    model = relu_model(RUNTIME_MAX_IR_VERSION + 1)
    note = fit_ir_version(model)
    assert note and "lowered" in note
    assert model.ir_version == 8  # what opset 17 needs
    assert loads(model)


def test_loadable_model_untouched() -> None:
    model = relu_model(8)
    assert fit_ir_version(model) is None and model.ir_version == 8


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT8E4M3FN, TensorProto.INT4])
def test_new_types_keep_their_ir(dtype: int) -> None:
    model = relu_model(RUNTIME_MAX_IR_VERSION + 1)
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(2, np.float32), "unused"))
    model.graph.initializer[0].data_type = dtype
    assert fit_ir_version(model) is None
