"""``cluster_weights``: weight sharing by per-layer k-means (16 or 256 centroids).

Each clustered weight is stored as small-integer indices plus a float codebook, and rebuilt
inside the graph, so the file really shrinks and stays plain ONNX that ONNX Runtime runs:

- 256 centroids: ``uint8`` indices → ``Cast(int32)`` → ``Gather(codebook)``;
- 16 centroids: indices packed two per byte (``uint8``), unpacked in-graph with ``Div``/``Mod``
  by 16, then ``Gather(codebook)`` and ``Reshape`` to the weight's shape.

The rebuilt tensor keeps the original weight's name, so the consuming Conv/Gemm/MatMul is not
touched. ONNX Runtime folds the rebuild at session start: the saving is on disk and on the wire,
not in runtime memory. A later ``distill`` trains the codebooks (indices stay fixed).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import Field

from service.engine.graph import default_opset
from service.engine.registry import Pass, PassContext, register
from service.engine.scope import LayerScopeConfig, select_layers
from service.engine.training.graph import get_array, serialized_sizes


class ClusterWeightsConfig(LayerScopeConfig):
    """k-means weight sharing per layer."""

    centroids: Literal[16, 256] = Field(
        16, description="codebook size: 16 (4-bit packed indices) or 256 (8-bit indices)"
    )
    iterations: int = Field(30, ge=1, le=500, description="Lloyd iterations per layer")
    exclude_first: bool = Field(False, description="leave the first layer as is")
    exclude_last: bool = Field(False, description="leave the last layer as is")
    min_elements: int = Field(
        256, ge=16, description="smaller tensors stay float (the codebook would not pay off)"
    )


def kmeans_1d(values: np.ndarray, k: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic 1-D k-means: (centroids [k] float32, indices [n] uint8).

    Starts from evenly spaced quantiles (dense regions get more centroids) and runs Lloyd's
    iterations with sorted centroids, so assignment is a binary search on the midpoints.
    """
    flat = values.reshape(-1).astype(np.float64)
    centroids = np.quantile(flat, (np.arange(k) + 0.5) / k)
    for _ in range(iterations):
        centroids = np.sort(centroids)
        idx = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, flat)
        sums = np.bincount(idx, weights=flat, minlength=k)
        counts = np.bincount(idx, minlength=k)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if np.allclose(updated, centroids):
            break
        centroids = updated
    centroids = np.sort(centroids)
    idx = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, flat)
    return centroids.astype(np.float32), idx.astype(np.uint8)


def _int64(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def cluster_tensor(
    model: onnx.ModelProto, weight: str, k: int, iterations: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], dict[str, Any]]:
    """Nodes and initializers that rebuild ``weight`` from indices + codebook, and notes."""
    array = get_array(model, weight)
    centroids, idx = kmeans_1d(array, k, iterations)
    rebuilt = centroids[idx].reshape(array.shape)
    p = f"{weight}__cluster"
    nodes: list[onnx.NodeProto] = []
    inits = [numpy_helper.from_array(centroids.astype(array.dtype), f"{p}_codebook")]
    if k == 256:
        inits.append(numpy_helper.from_array(idx.reshape(array.shape), f"{p}_idx"))
        nodes.append(
            helper.make_node("Cast", [f"{p}_idx"], [f"{p}_idx32"], to=onnx.TensorProto.INT32)
        )
        nodes.append(helper.make_node("Gather", [f"{p}_codebook", f"{p}_idx32"], [weight], axis=0))
    else:
        n = idx.size
        padded = np.concatenate([idx, np.zeros(n % 2, dtype=np.uint8)])
        packed = (padded[0::2] * 16 + padded[1::2]).astype(np.uint8)
        inits += [
            numpy_helper.from_array(packed, f"{p}_packed"),
            numpy_helper.from_array(np.array(16, dtype=np.int32), f"{p}_sixteen"),
            _int64(f"{p}_flat", [-1]),
            _int64(f"{p}_shape", list(array.shape)),
        ]
        nodes.append(
            helper.make_node("Cast", [f"{p}_packed"], [f"{p}_p32"], to=onnx.TensorProto.INT32)
        )
        nodes.append(helper.make_node("Div", [f"{p}_p32", f"{p}_sixteen"], [f"{p}_hi"]))
        nodes.append(helper.make_node("Mod", [f"{p}_p32", f"{p}_sixteen"], [f"{p}_lo"]))
        if default_opset(model, missing=1) >= 13:
            inits.append(_int64(f"{p}_axis1", [1]))
            nodes.append(helper.make_node("Unsqueeze", [f"{p}_hi", f"{p}_axis1"], [f"{p}_hi2"]))
            nodes.append(helper.make_node("Unsqueeze", [f"{p}_lo", f"{p}_axis1"], [f"{p}_lo2"]))
        else:
            nodes.append(helper.make_node("Unsqueeze", [f"{p}_hi"], [f"{p}_hi2"], axes=[1]))
            nodes.append(helper.make_node("Unsqueeze", [f"{p}_lo"], [f"{p}_lo2"], axes=[1]))
        nodes.append(helper.make_node("Concat", [f"{p}_hi2", f"{p}_lo2"], [f"{p}_pairs"], axis=1))
        nodes.append(helper.make_node("Reshape", [f"{p}_pairs", f"{p}_flat"], [f"{p}_idx"]))
        nodes.append(
            helper.make_node("Gather", [f"{p}_codebook", f"{p}_idx"], [f"{p}_values"], axis=0)
        )
        values = f"{p}_values"
        if n % 2:  # drop the padding index
            inits += [_int64(f"{p}_zero", [0]), _int64(f"{p}_n", [n])]
            nodes.append(helper.make_node("Slice", [values, f"{p}_zero", f"{p}_n"], [f"{p}_trim"]))
            values = f"{p}_trim"
        nodes.append(helper.make_node("Reshape", [values, f"{p}_shape"], [weight]))
    err = rebuilt - array
    notes = {
        "elements": int(array.size),
        "centroids_used": int(np.unique(idx).size),
        "relative_error": round(
            float(np.linalg.norm(err)) / max(float(np.linalg.norm(array)), 1e-12), 5
        ),
    }
    return nodes, inits, notes


@register
class ClusterWeights(Pass[ClusterWeightsConfig]):
    name = "cluster_weights"
    config_model = ClusterWeightsConfig
    quantizes = False
    calibrates = False
    trains = False
    scoped = True
    description = (
        "Per-layer k-means weight sharing (16 or 256 centroids) stored as packed integer "
        "indices plus a float codebook, rebuilt in-graph with Gather: a smaller file that "
        "ONNX Runtime runs as is."
    )

    def run(
        self, model: onnx.ModelProto, config: ClusterWeightsConfig, ctx: PassContext
    ) -> onnx.ModelProto:
        layers, skipped = select_layers(
            model,
            config,
            none_left=f"cluster_weights found no weight with at least {config.min_elements} "
            "elements",
        )
        out = onnx.ModelProto()
        out.CopyFrom(model)
        new_nodes: list[onnx.NodeProto] = []
        per_layer = {}
        clustered = set()
        for index, (_, weight) in enumerate(layers):
            ctx.check_cancelled()
            ctx.progress(index / len(layers), f"cluster_weights: layer {weight}")
            nodes, inits, notes = cluster_tensor(model, weight, config.centroids, config.iterations)
            new_nodes += nodes
            out.graph.initializer.extend(inits)
            per_layer[weight] = notes
            clustered.add(weight)
        kept = [t for t in out.graph.initializer if t.name not in clustered]
        del out.graph.initializer[:]
        out.graph.initializer.extend(kept)
        graph_inputs = [i for i in out.graph.input if i.name not in clustered]
        del out.graph.input[:]
        out.graph.input.extend(graph_inputs)
        # The rebuild nodes read initializers only: placing them first keeps topological order.
        old_nodes = list(out.graph.node)
        del out.graph.node[:]
        out.graph.node.extend(new_nodes + old_nodes)
        before, after = serialized_sizes(model), serialized_sizes(out)
        ctx.notes.update(
            {
                "centroids": config.centroids,
                "index_bits": 4 if config.centroids == 16 else 8,
                "layers": per_layer,
                "skipped": skipped,
                "bytes_before": before["bytes"],
                "bytes_after": after["bytes"],
                "size_ratio": round(before["bytes"] / after["bytes"], 3),
                "runtime_memory": "ONNX Runtime folds the codebook lookup at load time: "
                "the file shrinks, the weights in memory are float again",
            }
        )
        return out
