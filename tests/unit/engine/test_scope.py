"""The shared scope: one set of field names (older names still accepted, same meaning), one
selection of the layers a pass touches, and what a search uses to keep layers in float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from service.engine.errors import EngineError
from service.engine.graph import iter_graphs, tensor_uses
from service.engine.registry import get_pass, parse_step, registered_passes
from service.engine.scope import (
    EXCLUDED,
    LEGACY_NAMES,
    ScopeConfig,
    can_exclude_nodes,
    exclude_nodes,
    scope_of,
    select_layers,
    weighted_layers,
)
from tests import crafted

LAYER_PASSES = ("prune_magnitude", "prune_2_4", "cluster_weights", "prune_channels")


def _config(name: str, **params: object) -> ScopeConfig:
    config = parse_step({"pass": name, **params})[1]
    assert isinstance(config, ScopeConfig)
    return config


@pytest.mark.parametrize("name", LAYER_PASSES)
def test_older_layer_names_mean_the_canonical_ones(name: str) -> None:
    old = _config(name, skip=["w2"], skip_first_last=False)
    new = _config(name, nodes_to_exclude=["w2"], exclude_first=False, exclude_last=False)
    assert old == new
    assert old.skip == ["w2"] and old.skip_first_last is False
    assert _config(name, skip_first=True) == _config(name, exclude_first=True)
    assert _config(name, skip_first=True).skip_first is True


def test_fp16_block_list_is_op_types_to_exclude() -> None:
    old, new = _config("fp16", op_block_list=["Softmax"]), _config(
        "fp16", op_types_to_exclude=["Softmax"]
    )
    assert old == new and old.op_block_list == ["Softmax"]
    assert scope_of(old).op_types_to_exclude == ("Softmax",)
    assert scope_of(_config("fp16")).op_types_to_exclude is None  # None: fp16's own lists


def test_an_older_name_and_its_canonical_name_together_are_refused() -> None:
    for step in (
        {"pass": "prune_magnitude", "skip": ["a"], "nodes_to_exclude": ["b"]},
        {"pass": "cluster_weights", "skip_first_last": True, "exclude_last": False},
        {"pass": "fp16", "op_block_list": [], "op_types_to_exclude": []},
    ):
        with pytest.raises(EngineError) as info:
            parse_step(step)
        assert info.value.code == "invalid_recipe"
        assert "older name" in info.value.details["errors"][0]["message"]


def test_older_names_stay_where_they_were_accepted() -> None:
    for name, cls in registered_passes().items():
        model = cls.config_model
        legacy = model.legacy_names if issubclass(model, ScopeConfig) else frozenset()
        for old, new in LEGACY_NAMES.items():
            value = [] if old in ("skip", "op_block_list") else True
            if old in legacy:
                assert set(new) <= set(model.model_fields)
                parse_step({"pass": name, old: value})
            else:
                with pytest.raises(EngineError):
                    parse_step({"pass": name, old: value})
                assert not hasattr(model(), old)


def test_every_pass_that_names_nodes_can_keep_them_in_float() -> None:
    passes = registered_passes()
    able = {n for n, c in passes.items() if can_exclude_nodes(c)}
    assert able == {n for n, c in passes.items() if "nodes_to_exclude" in c.config_model.model_fields}
    assert {"quantize_static", "quantize_dynamic", "int4_weight_only", "fp16"} <= able
    assert "graph_optimize" not in able and "distill" not in able


def test_exclude_nodes_adds_to_a_steps_own_exclusions_under_the_canonical_name() -> None:
    step = {"pass": "quantize_static", "per_channel": True}
    assert exclude_nodes(step, ["conv1"]) == {**step, "nodes_to_exclude": ["conv1"]}
    assert step == {"pass": "quantize_static", "per_channel": True}  # a copy
    own = {"pass": "prune_magnitude", "skip": ["fc1"]}
    merged = exclude_nodes(own, ["fc2", "fc1"])
    assert merged == {"pass": "prune_magnitude", "nodes_to_exclude": ["fc1", "fc2"]}
    parse_step(merged)


def test_weighted_layers_lists_named_weight_layers_largest_first() -> None:
    layers = weighted_layers(crafted.mlp(), ("MatMul", "Gemm", "Conv"))
    assert [name for name, _, _ in layers] == ["fc2", "fc1", "fc3"]
    assert layers[0] == ("fc2", "MatMul", 512 * 512)
    assert weighted_layers(crafted.mlp(), ("Conv",)) == []


def test_select_layers_first_last_names_and_size() -> None:
    model = crafted.mlp()
    config = _config("prune_magnitude")
    chosen, skipped = select_layers(model, config)
    assert [w for _, w in chosen] == ["w2"]
    assert skipped == {"w1": "first layer", "w3": "last layer"}

    config = _config("prune_magnitude", exclude_first=False, exclude_last=False, skip=["fc2"])
    chosen, skipped = select_layers(model, config)
    assert [w for _, w in chosen] == ["w1", "w3"] and skipped == {"w2": EXCLUDED}
    # A weight initializer's name works as well as its node's.
    chosen, _ = select_layers(model, _config("prune_magnitude", nodes_to_exclude=["w2"]))
    assert chosen == []

    config = _config("cluster_weights", min_elements=64 * 512 + 1)
    chosen, skipped = select_layers(model, config)
    assert [w for _, w in chosen] == ["w2"] and set(skipped) == {"w1", "w3"}

    with pytest.raises(EngineError) as info:
        select_layers(model, _config("prune_2_4", op_types=["Conv"]), none_left="nothing here")
    assert info.value.code == "no_effect" and info.value.message == "nothing here"


def _three_layers() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.normal(size=(8, 8)).astype(np.float32), f"w{i}") for i in (1, 2, 3)]
    nodes = [
        h.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        h.make_node("Gemm", ["a", "w2"], ["b"], name="gemm"),
        h.make_node("MatMul", ["b", "w3"], ["y"], name="mm2"),
    ]
    graph = h.make_graph(
        nodes, "three", [h.make_tensor_value_info("x", T.FLOAT, [1, 8])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 8])], inits,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_first_and_last_are_those_of_the_selected_op_types() -> None:
    model = _three_layers()
    chosen, skipped = select_layers(model, _config("prune_magnitude", op_types=["MatMul"]))
    assert chosen == [] and skipped == {"w1": "first layer", "w3": "last layer"}
    # A single selected layer is neither kept as first nor as last.
    chosen, skipped = select_layers(model, _config("prune_magnitude", op_types=["Gemm"]))
    assert [w for _, w in chosen] == ["w2"] and skipped == {}
    # Excluding a layer by name does not move the first/last positions.
    chosen, skipped = select_layers(model, _config("prune_magnitude", skip=["mm1"]))
    assert [w for _, w in chosen] == ["w2"] and skipped == {"w1": EXCLUDED, "w3": "last layer"}


def test_scope_of_a_config_without_scope_fields_restricts_nothing() -> None:
    scope = scope_of(_config("int4_weight_only"))
    assert scope.op_types is None and scope.takes("Anything")
    assert scope.nodes_to_exclude == () and not scope.excludes("fc1")
    scope = scope_of(_config("quantize_dynamic", nodes_to_exclude=["fc1"]))
    assert scope.excludes("fc1") and not scope.excludes("fc2", "fc1_weight")
    assert scope.takes("MatMul") and not scope.takes("Conv")


def test_iter_graphs_and_uses_reach_subgraphs_with_their_depth() -> None:
    model = crafted.if_branch_weights()
    depths = {g.name: d for g, d in iter_graphs(model.graph)}
    assert depths == {"if_weights": 0, "then_branch": 1, "else_branch": 1}
    uses = tensor_uses(model)
    assert [(u.node.name, u.depth) for u in uses["x"]] == [
        ("sum", 0), ("mm_else", 1), ("mm_then", 1),  # If's attributes: else_branch first
    ]
    assert get_pass("quantize_dynamic").scoped
