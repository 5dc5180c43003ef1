"""``quantize_aware_training``: int8 QAT with the float model as teacher, exported as QDQ ONNX.

The model runs in the training bridge with fake quantization (int8 per-channel weights, uint8
activations with learned scales, see ``service.engine.training.fake_quant``), is fine-tuned on
``ctx.dataset`` by distillation from the float model entering the pass (plus label
cross-entropy when labels exist) with the shared loop, then exported as QDQ ONNX with the
learned scales. Where post-training static quantization loses accuracy (activation ranges with
outliers, layers sensitive to rounding) the weights and scales adapt to the int8 grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from pydantic import Field

from service.engine.errors import EngineError
from service.engine.registry import Pass, PassContext, register
from service.engine.scope import ScopeConfig
from service.engine.training.settings import (
    LAYER_OPS,
    DistillationSettings,
    LayerOp,
    TrainingBudget,
)


class QuantizeAwareTrainingConfig(ScopeConfig, DistillationSettings):
    """QAT: which layers, how many calibration samples, and the distillation loss and budget."""

    op_types: list[LayerOp] = Field(
        default_factory=lambda: list(LAYER_OPS), description="layers quantized"
    )
    calibration_samples: int = Field(
        256, ge=1, description="samples observed to initialise the activation scales"
    )
    reduce_range: bool | None = Field(
        None,
        description="7-bit weights (|w| <= 64) for x86 CPUs without VNNI/AMX, whose int8 "
        "kernels saturate otherwise; None = chosen for the job's target and measuring host",
    )
    scale_lr: float = Field(
        0.02, gt=0, le=1.0, description="Adam learning rate of the log activation scales"
    )
    budget: TrainingBudget = Field(
        default_factory=lambda: TrainingBudget.model_validate({"max_steps": 200, "lr": 1e-4}),
        description="fine-tuning budget; a small learning rate keeps the float solution",
    )


@register
class QuantizeAwareTraining(Pass[QuantizeAwareTrainingConfig]):
    name = "quantize_aware_training"
    config_model = QuantizeAwareTrainingConfig
    quantizes = True
    calibrates = False  # its activation scales are learned (initialised on dataset samples)
    trains = True
    scoped = True
    description = (
        "Quantization-aware training: fake-quantized int8 (per-channel weights, learned "
        "activation scales) fine-tuned against the float model, exported as QDQ ONNX."
    )

    def run(
        self, model: onnx.ModelProto, config: QuantizeAwareTrainingConfig, ctx: PassContext
    ) -> onnx.ModelProto:
        from service.engine.training.bridge import OnnxModule, check_trainable
        from service.engine.training.distillation import (
            Teacher,
            accuracy,
            agreement,
            check_dataset,
            distill_into,
            run_onnx,
        )
        from service.engine.training.fake_quant import (
            FakeQuantizedModule,
            export_qdq,
            plan_quantization,
        )

        data = ctx.dataset or {}
        n = check_dataset(model, ctx.dataset, config.min_samples, "quantize_aware_training")
        if ctx.labels is not None and len(ctx.labels) != n:
            raise EngineError(
                "invalid_dataset", f"dataset has {n} samples but {len(ctx.labels)} labels"
            )
        check_trainable(model)  # an already-quantized graph fails here, naming its op
        plan = plan_quantization(model, list(config.op_types))
        if not plan.weights:
            raise EngineError(
                "no_effect", "quantize_aware_training found no Conv/Gemm/MatMul weight to quantize"
            )
        module = OnnxModule(model)
        rng = np.random.default_rng(config.budget.seed)
        calib_idx = np.sort(rng.permutation(n)[: config.calibration_samples])
        encoding = ctx.int8_encoding(config.reduce_range)
        fq = FakeQuantizedModule(module, plan, {k: v[calib_idx] for k, v in data.items()},
                                 weight_max=encoding.weight_max)
        settings = DistillationSettings.model_validate(
            config.model_dump(include=set(DistillationSettings.model_fields))
        )
        result = distill_into(
            module,
            [Teacher(model, 1.0, "float model")],
            data,
            ctx.labels,
            settings,
            progress=ctx.progress,
            check_cancelled=ctx.check_cancelled,
            extra_parameters=fq.parameters(),
            extra_lr_scale=config.scale_lr / config.budget.lr,
            label="quantize_aware_training",
        )
        qdq = export_qdq(model, fq)
        try:
            onnx.checker.check_model(qdq)
        except Exception as exc:  # the export must be valid ONNX; say which check failed
            raise EngineError("pass_failed", f"QDQ export does not validate: {exc}") from None
        notes: dict[str, Any] = {
            "training": result.as_notes(),
            "format": "QDQ (int8 per-channel weights, uint8 activations, int32 biases)",
            "encoding": encoding.as_notes(),
            "quantized_weights": len(plan.weights),
            "quantized_activations": len(plan.activations),
            "activation_scales": {k: round(q.scale, 8) for k, q in fq.quantizers.items()},
        }
        first = model.graph.output[0].name
        t_out = run_onnx(model, data, [first])[first]
        q_out = run_onnx(qdq, data, [qdq.graph.output[0].name])[qdq.graph.output[0].name]
        if t_out.ndim == 2:
            notes["teacher_agreement"] = agreement(q_out, t_out)
        if ctx.labels is not None:
            notes["accuracy_float"] = accuracy(model, data, ctx.labels)
            notes["accuracy_qat"] = accuracy(qdq, data, ctx.labels)
        notes["measured_on"] = "the pass's training data"
        ctx.notes.update(notes)
        return qdq
