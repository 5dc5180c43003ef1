"""``distill``: knowledge distillation into the current model or an uploaded student.

Teacher: the job's model as ingested (``teacher="original"``, the usual choice after pruning or
clustering) or the model as it enters this pass (``teacher="input"``), plus any number of other
uploaded ONNX models named by id (multi-teacher distillation, weighted). Student: the model as it
enters this pass, or an uploaded ONNX student named by ``student_model_id`` (it must take the same
inputs and produce outputs of the same shapes). Training runs on ``ctx.dataset`` (labels optional)
with the shared CPU loop (``service.engine.training``); the learned weights are written back into
the student's own graph.
"""

from __future__ import annotations

from typing import Any, Literal

import onnx
from pydantic import BaseModel, ConfigDict, Field

from service.engine.registry import Pass, PassConfig, PassContext, register
from service.engine.training.settings import DistillationSettings, TrainingBudget


class TeacherRef(BaseModel):
    """An extra teacher: an uploaded ONNX model and its weight in the loss."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_id: str = Field(min_length=1, description="id of an uploaded model")
    weight: float = Field(1.0, gt=0, description="relative weight of this teacher")


class DistillConfig(PassConfig, DistillationSettings):
    """Distillation: who teaches, who learns, the loss (see DistillationSettings) and budget."""

    teacher: Literal["original", "input"] = Field(
        "original",
        description="main teacher: the job's model as ingested, or the model entering this pass",
    )
    teacher_weight: float = Field(1.0, gt=0, description="weight of the main teacher")
    teachers: list[TeacherRef] = Field(
        default_factory=list, description="extra teachers (uploaded models), weighted"
    )
    student_model_id: str | None = Field(
        None, description="an uploaded ONNX student; default: the model entering this pass"
    )
    budget: TrainingBudget = Field(
        default_factory=lambda: TrainingBudget.model_validate({}),
        description="training budget: steps, seconds, batch size, learning rate, seed, threads",
    )

    def referenced_models(self) -> list[str]:
        extra = [self.student_model_id] if self.student_model_id else []
        return [ref.model_id for ref in self.teachers] + extra


@register
class Distill(Pass[DistillConfig]):
    name = "distill"
    config_model = DistillConfig
    quantizes = False
    calibrates = False
    trains = True
    scoped = False
    description = (
        "Knowledge distillation (softened-logit KL, optional label CE and feature matching) "
        "from the original model and optional extra teachers into the current or an uploaded "
        "student; CPU training with step and time budgets."
    )

    def run(
        self, model: onnx.ModelProto, config: DistillConfig, ctx: PassContext
    ) -> onnx.ModelProto:
        from service.engine.training.distillation import (
            Teacher,
            accuracy,
            agreement,
            distill_model,
            load_referenced_model,
            run_onnx,
        )

        main = ctx.original if config.teacher == "original" and ctx.original is not None else model
        teachers = [Teacher(main, config.teacher_weight, f"{config.teacher} model")]
        for ref in config.teachers:
            extra = load_referenced_model(ctx.resolve_model, ref.model_id, "teacher")
            teachers.append(Teacher(extra, ref.weight, f"teacher {ref.model_id}"))
        student = model
        if config.student_model_id:
            student = load_referenced_model(ctx.resolve_model, config.student_model_id, "student")
        settings = DistillationSettings.model_validate(
            config.model_dump(include=set(DistillationSettings.model_fields))
        )
        trained, notes = distill_model(
            student,
            teachers,
            ctx.dataset or {},
            ctx.labels,
            settings,
            progress=ctx.progress,
            check_cancelled=ctx.check_cancelled,
        )
        notes["student"] = config.student_model_id or "model entering the pass"
        data = ctx.dataset or {}
        first = main.graph.output[0].name
        t_out = run_onnx(main, data, [first])[first]
        s_first = trained.graph.output[0].name
        before = run_onnx(student, data, [student.graph.output[0].name])
        after = run_onnx(trained, data, [s_first])[s_first]
        summary: dict[str, Any] = {}
        if t_out.ndim == 2:
            summary["teacher_agreement_before"] = agreement(next(iter(before.values())), t_out)
            summary["teacher_agreement_after"] = agreement(after, t_out)
        if ctx.labels is not None:
            summary["accuracy_teacher"] = accuracy(main, data, ctx.labels)
            summary["accuracy_before"] = accuracy(student, data, ctx.labels)
            summary["accuracy_after"] = accuracy(trained, data, ctx.labels)
        notes["measured_on"] = "the pass's training data (the pipeline's evaluation is separate)"
        notes.update(summary)
        ctx.notes.update(notes)
        return trained
