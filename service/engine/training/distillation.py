"""Knowledge distillation on the shared loop: teachers in ONNX Runtime, the student in the bridge.

Teacher outputs (and requested intermediate features) are computed once with ONNX Runtime over
the whole dataset; the student runs in :class:`OnnxModule`. The loss is

    soft_weight * T^2 * sum_t w_t KL(softmax(teacher_t / T) || softmax(student / T))
    + hard_weight * CE(student, labels)                  (when labels are given)
    + feature_weight * sum_pairs MSE(student feature, teacher feature)

with the teacher weights ``w_t`` normalised to sum to 1. Outputs that are not class scores
(not ``[batch, classes]``) are matched with MSE instead of KL (``loss="auto"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from service.engine.errors import EngineError
from service.engine.training.bridge import OnnxModule
from service.engine.training.loop import TrainingResult, train
from service.engine.training.settings import DistillationSettings

# --------------------------------------------------------------------------- ONNX Runtime side


def run_onnx(
    model: onnx.ModelProto,
    inputs: dict[str, np.ndarray],
    outputs: list[str] | None = None,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Run ``model`` with ONNX Runtime over all samples; extra ``outputs`` may be intermediates."""
    import onnxruntime as ort

    model = _with_outputs(model, outputs or [])
    names = outputs or [o.name for o in model.graph.output]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    feed_names = [i.name for i in session.get_inputs()]
    n = len(next(iter(inputs.values())))
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, n, batch_size):
        feed = {k: inputs[k][start : start + batch_size] for k in feed_names}
        for name, value in zip(names, session.run(names, feed), strict=True):
            chunks[name].append(np.asarray(value))
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def _with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    existing = {o.name for o in model.graph.output}
    extra = [n for n in names if n not in existing]
    if not extra:
        return model
    produced = {o for node in model.graph.node for o in node.output}
    missing = [n for n in extra if n not in produced]
    if missing:
        raise EngineError(
            "invalid_recipe",
            f"tensor(s) {', '.join(missing)} are not produced by any node of the model",
            {"tensors": missing},
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for name in extra:
        out.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return out


def accuracy(model: onnx.ModelProto, inputs: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy of the first output against integer labels (ONNX Runtime)."""
    first = model.graph.output[0].name
    logits = run_onnx(model, inputs, [first])[first]
    return float((logits.reshape(len(labels), -1).argmax(1) == labels).mean())


def agreement(student: np.ndarray, teacher: np.ndarray) -> float:
    """Share of samples whose arg-max class is the same (2-D outputs)."""
    s = student.reshape(len(student), -1).argmax(1)
    t = teacher.reshape(len(teacher), -1).argmax(1)
    return float((s == t).mean())


# --------------------------------------------------------------------------- validation


def check_dataset(
    model: onnx.ModelProto, dataset: dict[str, np.ndarray] | None, min_samples: int, what: str
) -> int:
    """Validate ``dataset`` against ``model``'s inputs; returns the sample count.

    Raises ``invalid_dataset`` naming the missing input, the wrong dimension or the count.
    """
    if not dataset:
        raise EngineError(
            "invalid_dataset",
            f"{what} trains on data: upload a dataset (.npz keyed by input name) with the job",
        )
    inits = {t.name for t in model.graph.initializer}
    counts = {len(v) for v in dataset.values()}
    if len(counts) != 1:
        raise EngineError("invalid_dataset", "dataset arrays have different sample counts")
    n = counts.pop()
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if vi.name not in dataset:
            raise EngineError(
                "invalid_dataset",
                f"dataset has no array for model input {vi.name!r}",
                {"input": vi.name, "arrays": sorted(dataset)},
            )
        array = dataset[vi.name]
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and array.ndim != len(dims):
            raise EngineError(
                "invalid_dataset",
                f"dataset array {vi.name!r} has {array.ndim} dimensions, "
                f"the model input has {len(dims)}",
                {"input": vi.name, "shape": list(array.shape)},
            )
        for axis, d in enumerate(dims):
            if axis and d.HasField("dim_value") and array.shape[axis] != d.dim_value:
                raise EngineError(
                    "invalid_dataset",
                    f"dataset array {vi.name!r} has size {array.shape[axis]} on axis {axis}, "
                    f"the model input needs {d.dim_value}",
                    {"input": vi.name, "axis": axis, "shape": list(array.shape)},
                )
    if n < min_samples:
        raise EngineError(
            "invalid_dataset",
            f"{what} needs at least {min_samples} samples, the dataset has {n}",
            {"samples": n, "min_samples": min_samples},
        )
    return n


def check_compatible(
    student: onnx.ModelProto, teacher: onnx.ModelProto, sample: dict[str, np.ndarray], who: str
) -> None:
    """Raise ``incompatible_student`` unless both graphs take the same inputs and produce
    outputs of the same count and per-sample shape (checked by running both on ``sample``)."""
    inits = {t.name for t in student.graph.initializer}
    s_inputs = {i.name for i in student.graph.input if i.name not in inits}
    missing = sorted(s_inputs - set(sample))
    if missing:
        raise EngineError(
            "incompatible_student",
            f"student input(s) {', '.join(missing)} are not inputs of {who}",
            {"student_inputs": sorted(s_inputs), "teacher_inputs": sorted(sample)},
        )
    s_out = [o.name for o in student.graph.output]
    t_out = [o.name for o in teacher.graph.output]
    if len(s_out) != len(t_out):
        raise EngineError(
            "incompatible_student",
            f"the student has {len(s_out)} output(s), {who} has {len(t_out)}",
            {"student_outputs": s_out, "teacher_outputs": t_out},
        )
    try:
        s_vals = run_onnx(student, sample)
    except EngineError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types
        raise EngineError(
            "incompatible_student",
            f"the student does not run on the dataset's inputs: {type(exc).__name__}",
        ) from None
    t_vals = run_onnx(teacher, sample)
    for s_name, t_name in zip(s_out, t_out, strict=True):
        s_shape, t_shape = list(s_vals[s_name].shape[1:]), list(t_vals[t_name].shape[1:])
        if s_shape != t_shape:
            raise EngineError(
                "incompatible_student",
                f"student output {s_name!r} has per-sample shape {s_shape}, "
                f"{who} output {t_name!r} has {t_shape}",
                {
                    "student_output": s_name,
                    "teacher_output": t_name,
                    "student_shape": s_shape,
                    "teacher_shape": t_shape,
                },
            )


# --------------------------------------------------------------------------- training


@dataclass
class Teacher:
    """A teacher model with its weight in the loss."""

    model: onnx.ModelProto
    weight: float = 1.0
    label: str = "teacher"


def sparsity_masks(module: OnnxModule, min_zero_fraction: float = 0.05) -> dict[str, torch.Tensor]:
    """Masks of the non-zero entries of weight tensors (>= 2-D) that are visibly pruned."""
    masks = {}
    for name, param in module.named_onnx_parameters().items():
        if param.dim() < 2:
            continue
        mask = param.detach() != 0
        if 1.0 - float(mask.float().mean()) >= min_zero_fraction:
            masks[name] = mask
    return masks


def distill_into(
    student: OnnxModule,
    teachers: list[Teacher],
    inputs: dict[str, np.ndarray],
    labels: np.ndarray | None,
    settings: DistillationSettings,
    *,
    progress: Callable[[float, str], None] = lambda f, m: None,
    check_cancelled: Callable[[], None] = lambda: None,
    extra_parameters: Iterable[torch.nn.Parameter] = (),
    extra_lr_scale: float = 1.0,
    label: str = "distill",
) -> TrainingResult:
    """Train ``student`` (in place) to match ``teachers`` on ``inputs`` with the shared loop."""
    if not teachers:
        raise EngineError("invalid_recipe", "distillation needs at least one teacher")
    total_w = sum(t.weight for t in teachers)
    if total_w <= 0:
        raise EngineError("invalid_recipe", "teacher weights must sum to a positive number")
    s_out = student.output_names
    feats = settings.features
    targets: list[tuple[float, dict[str, torch.Tensor]]] = []
    for i, teacher in enumerate(teachers):
        t_names = [o.name for o in teacher.model.graph.output]
        wanted = t_names + ([f.teacher for f in feats] if i == 0 else [])
        values = run_onnx(teacher.model, inputs, wanted)
        mapped = {s: torch.from_numpy(values[t]) for s, t in zip(s_out, t_names, strict=True)}
        if i == 0:
            for f in feats:
                mapped[f"feature:{f.student}"] = torch.from_numpy(values[f.teacher])
        targets.append((teacher.weight / total_w, mapped))
    y = torch.from_numpy(labels.astype(np.int64)) if labels is not None else None
    use_hard = y is not None and settings.hard_weight > 0
    T = settings.temperature

    def kind(name: str) -> str:
        if settings.loss != "auto":
            return settings.loss
        return "kl" if targets[0][1][name].dim() == 2 else "mse"

    kinds = {name: kind(name) for name in s_out}

    def loss_fn(outputs: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        loss = torch.zeros(())
        if settings.soft_weight > 0:
            for weight, target in targets:
                for name in s_out:
                    s, t = outputs[name], target[name][idx]
                    if kinds[name] == "kl":
                        term = F.kl_div(
                            F.log_softmax(s / T, dim=-1),
                            F.log_softmax(t / T, dim=-1),
                            log_target=True,
                            reduction="batchmean",
                        ) * (T * T)
                    else:
                        term = F.mse_loss(s, t)
                    loss = loss + settings.soft_weight * weight * term
        if use_hard:
            assert y is not None
            logits = outputs[s_out[0]]
            loss = loss + settings.hard_weight * F.cross_entropy(
                logits.reshape(len(idx), -1), y[idx]
            )
        for f in feats:
            s, t = outputs[f.student], targets[0][1][f"feature:{f.student}"][idx]
            if s.shape != t.shape:
                raise EngineError(
                    "incompatible_student",
                    f"feature {f.student!r} of the student has shape {list(s.shape[1:])}, "
                    f"teacher feature {f.teacher!r} has {list(t.shape[1:])}",
                )
            loss = loss + settings.feature_weight * F.mse_loss(s, t)
        return loss

    masks = sparsity_masks(student) if settings.preserve_sparsity else {}
    params = student.named_onnx_parameters()

    def reapply_masks() -> None:
        for name, mask in masks.items():
            params[name].mul_(mask)

    return train(
        student,
        inputs,
        loss_fn,
        settings.budget,
        progress=progress,
        check_cancelled=check_cancelled,
        capture=[f.student for f in feats],
        extra_parameters=extra_parameters,
        extra_lr_scale=extra_lr_scale,
        after_step=reapply_masks if masks else None,
        label=label,
    )


def distill_model(
    student: onnx.ModelProto,
    teachers: list[Teacher],
    inputs: dict[str, np.ndarray],
    labels: np.ndarray | None,
    settings: DistillationSettings,
    *,
    progress: Callable[[float, str], None] = lambda f, m: None,
    check_cancelled: Callable[[], None] = lambda: None,
    label: str = "distill",
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Distill ``teachers`` into ``student``; returns the trained ONNX model and notes.

    Validates the dataset and the student/teacher compatibility first (precise errors), then
    trains with the shared loop and writes the weights back into the student's initializers.
    """
    n = check_dataset(student, inputs, settings.min_samples, label)
    sample = {k: v[: min(2, n)] for k, v in inputs.items()}
    for t in teachers:
        check_dataset(t.model, inputs, 1, f"teacher {t.label}")
        check_compatible(student, t.model, sample, t.label)
    if labels is not None and len(labels) != n:
        raise EngineError("invalid_dataset", f"dataset has {n} samples but {len(labels)} labels")
    module = OnnxModule(student)
    result = distill_into(
        module,
        teachers,
        inputs,
        labels,
        settings,
        progress=progress,
        check_cancelled=check_cancelled,
        label=label,
    )
    trained = module.write_back()
    notes: dict[str, Any] = {
        "training": result.as_notes(),
        "samples": n,
        "teachers": [{"model": t.label, "weight": t.weight} for t in teachers],
    }
    return trained, notes


def load_referenced_model(
    resolve_model: Callable[[str], Any] | None, model_id: str, role: str
) -> onnx.ModelProto:
    """Load another uploaded model (a student or an extra teacher) by its model id."""
    if resolve_model is None:
        raise EngineError(
            "invalid_recipe",
            f"{role} model {model_id!r} cannot be looked up by this caller",
            {"model_id": model_id},
        )
    try:
        path = resolve_model(model_id)
    except EngineError:
        raise
    except (KeyError, FileNotFoundError, LookupError):
        raise EngineError(
            "invalid_recipe", f"{role} model {model_id!r} does not exist", {"model_id": model_id}
        ) from None
    if path is None:
        raise EngineError(
            "invalid_recipe", f"{role} model {model_id!r} does not exist", {"model_id": model_id}
        )
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, OSError...
        raise EngineError(
            "invalid_model",
            f"{role} model {model_id!r} is not a valid ONNX model ({type(exc).__name__})",
            {"model_id": model_id},
        ) from None
    return model
