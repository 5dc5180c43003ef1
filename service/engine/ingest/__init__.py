"""Ingest: read an untrusted upload, refuse what is unsafe or broken, and describe the model.

The code lives in ``validate.py`` while the package is split into modules; the names every
caller imports from ``service.engine.ingest`` stay importable from here.
"""

from service.engine.ingest.validate import (
    EXPORT_HINT,
    MAX_OPSET,
    RUNTIME_MAX_IR_VERSION,
    IngestedModel,
    describe,
    detect_quantization,
    dtype_name,
    expanded_node_count,
    fit_ir_version,
    graph_inputs,
    inspect_upload,
    iter_graphs,
    load_model,
    parameter_count,
    sniff,
    unknown_dynamic_dims,
    validate,
)
from service.engine.ingest.validate import _subgraph_free_names as _subgraph_free_names

__all__ = [
    "EXPORT_HINT",
    "MAX_OPSET",
    "RUNTIME_MAX_IR_VERSION",
    "IngestedModel",
    "describe",
    "detect_quantization",
    "dtype_name",
    "expanded_node_count",
    "fit_ir_version",
    "graph_inputs",
    "inspect_upload",
    "iter_graphs",
    "load_model",
    "parameter_count",
    "sniff",
    "unknown_dynamic_dims",
    "validate",
]
