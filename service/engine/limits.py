"""Resource limits for everything the engine reads from a user.

One frozen object, with defaults safe for a worker with a few GiB of memory. The worker builds it
from the settings and hands it down; tests shrink it to exercise the guards cheaply.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class EngineLimits(BaseModel):
    """Caps against hostile or accidental inputs, and the evaluation budget."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_model_bytes: int = Field(
        default=2_000_000_000,
        gt=0,
        description="Largest model (graph + weights, external data included), in bytes. The "
        "service sizes it by the worker's disk (``service.config.limits_for``); a model past "
        "2 GiB (what one protobuf holds) is only taken as an archive with external data.",
    )
    external_data_inline_bytes: int = Field(
        default=512 << 20,
        ge=0,
        description="An archive's external data up to this many bytes is read into the model "
        "(the whole model in memory); beyond it, and always beyond 2 GiB, the weights stay in "
        "their verified files and are read one tensor at a time.",
    )
    max_archive_members: int = Field(default=256, gt=0, description="Most members in an uploaded archive.")
    max_uncompressed_bytes: int = Field(
        default=4_000_000_000, gt=0, description="Most bytes an archive may expand to."
    )
    max_compression_ratio: float = Field(
        default=100.0,
        gt=1.0,
        description="Largest uncompressed/compressed ratio of an archive or one of its members "
        "(zip-bomb guard; float weights compress far less than 10x).",
    )
    max_tensor_elements: int = Field(
        default=1 << 31,
        gt=0,
        description="Most elements of any tensor, stored or declared (inputs, outputs, "
        "inferred intermediates, ConstantOfShape results).",
    )
    max_dim: int = Field(default=1 << 31, gt=0, description="Largest single declared dimension.")
    max_nodes: int = Field(
        default=200_000,
        gt=0,
        description="Most nodes, all subgraphs included and every call of a model-local "
        "function counted as its whole (expanded) body.",
    )
    max_subgraph_depth: int = Field(
        default=8, ge=0, description="Deepest nesting of If/Loop/Scan bodies (main graph = 0)."
    )
    max_function_depth: int = Field(
        default=32,
        ge=0,
        description="Deepest chain of calls between model-local functions (a graph calling a "
        "function = 1); recursion is refused outright.",
    )
    max_dataset_bytes: int = Field(
        default=512 * 1024 * 1024, gt=0, description="Largest dataset .npz, in bytes, compressed or not."
    )
    eval_samples: int = Field(
        default=16, gt=0, description="Evaluation inputs: generated ones, or the first N dataset samples."
    )
    segment_weight_bytes: int | None = Field(
        default=None,
        gt=0,
        description="Run the float original segment by segment, each segment holding at most "
        "this many bytes of its weights, when its external weights pass it "
        "(``service.engine.segments``). None: decided by the job's memory limit (segments of "
        "a fifth of it when the weights pass half of it; whole without a limit).",
    )
    latency_runs: int = Field(
        default=15, gt=0, description="Timed runs per model (interleaved original/candidate; median)."
    )
    latency_warmup: int = Field(default=3, ge=0, description="Untimed warm-up runs per model.")
    latency_threads: int = Field(
        default=1, gt=0, description="ONNX Runtime intra-op threads of the first latency "
        "measurement (and of fidelity runs)."
    )
    latency_target_threads: bool = Field(
        default=True, description="Also measure latency at the target's own thread count "
        "where this host runs the target's kernels (that count decides); false: only at "
        "latency_threads (a benchmark pinning one thread count).",
    )
