"""The one training loop every training pass uses (distill, recovery rounds, QAT).

CPU only, deterministic (seeded batch order and torch seed), bounded by a step budget AND a
time budget (whichever comes first), cancellable between steps, reporting progress as
``ctx.progress(fraction, "epoch E step S/N loss L")``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from service.engine.training.bridge import OnnxModule
from service.engine.training.settings import TrainingBudget


@dataclass
class TrainingResult:
    """What the loop did: steps run, epochs seen, why it stopped, loss at start and end."""

    steps: int
    epochs: float
    seconds: float
    stopped_by: str  # "steps" | "time"
    first_loss: float
    final_loss: float
    losses: list[float] = field(default_factory=list)

    def as_notes(self) -> dict[str, object]:
        return {
            "steps": self.steps,
            "epochs": round(self.epochs, 3),
            "seconds": round(self.seconds, 2),
            "stopped_by": self.stopped_by,
            "first_loss": round(self.first_loss, 5),
            "final_loss": round(self.final_loss, 5),
        }


LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def train(
    module: OnnxModule,
    inputs: dict[str, np.ndarray],
    loss_fn: LossFn,
    budget: TrainingBudget,
    *,
    progress: Callable[[float, str], None] = lambda f, m: None,
    check_cancelled: Callable[[], None] = lambda: None,
    capture: Iterable[str] = (),
    extra_parameters: Iterable[torch.nn.Parameter] = (),
    extra_lr_scale: float = 1.0,
    after_step: Callable[[], None] | None = None,
    label: str = "training",
) -> TrainingResult:
    """Fit ``module`` on ``inputs`` by minimising ``loss_fn(outputs, batch_indices)``.

    ``outputs`` holds the graph outputs and the ``capture`` tensors for the batch; the loss
    function looks up per-sample targets (teacher logits, labels) by ``batch_indices``.
    ``extra_parameters`` (not part of the module, e.g. learned quantization scales) train with
    ``budget.lr * extra_lr_scale``. ``after_step`` runs after each optimizer step (e.g. to re-apply sparsity masks).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(budget.threads)
    try:
        return _train(
            module,
            inputs,
            loss_fn,
            budget,
            progress=progress,
            check_cancelled=check_cancelled,
            capture=capture,
            extra_parameters=extra_parameters,
            extra_lr_scale=extra_lr_scale,
            after_step=after_step,
            label=label,
        )
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    module: OnnxModule,
    inputs: dict[str, np.ndarray],
    loss_fn: LossFn,
    budget: TrainingBudget,
    *,
    progress: Callable[[float, str], None],
    check_cancelled: Callable[[], None],
    capture: Iterable[str],
    extra_parameters: Iterable[torch.nn.Parameter],
    extra_lr_scale: float,
    after_step: Callable[[], None] | None,
    label: str,
) -> TrainingResult:
    torch.manual_seed(budget.seed)
    rng = np.random.default_rng(budget.seed)
    n = len(next(iter(inputs.values())))
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
    groups: list[dict[str, object]] = [
        {"params": [p for p in module.parameters() if p.requires_grad], "lr": budget.lr}
    ]
    extra = list(extra_parameters)
    if extra:  # e.g. quantization scales, which learn on a log scale and need a larger step
        groups.append({"params": extra, "lr": budget.lr * extra_lr_scale})
    optimizer = torch.optim.Adam(groups)
    capture = list(capture)
    batch = min(budget.batch_size, n)
    start = time.monotonic()
    losses: list[float] = []
    order = rng.permutation(n)
    cursor = 0
    seen = 0
    stopped_by = "steps"
    module.train()
    report_every = max(1, budget.max_steps // 20)
    for step in range(budget.max_steps):
        check_cancelled()
        if time.monotonic() - start > budget.max_seconds:
            stopped_by = "time"
            break
        if cursor + batch > n:  # new epoch: reshuffle (drop the ragged tail for equal batches)
            order = rng.permutation(n)
            cursor = 0
        idx = torch.from_numpy(order[cursor : cursor + batch].copy())
        cursor += batch
        seen += batch
        outputs = module({k: v[idx] for k, v in tensors.items()}, capture=capture)
        loss = loss_fn(outputs, idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            with torch.no_grad():
                after_step()
        losses.append(float(loss.detach()))
        if step % report_every == 0 or step == budget.max_steps - 1:
            progress(
                (step + 1) / budget.max_steps,
                f"{label}: epoch {seen / n:.2f} step {step + 1}/{budget.max_steps} "
                f"loss {losses[-1]:.4f}",
            )
    module.eval()
    steps = len(losses)
    tail = losses[-max(1, min(10, steps)) :] if losses else [float("nan")]
    return TrainingResult(
        steps=steps,
        epochs=seen / n,
        seconds=time.monotonic() - start,
        stopped_by=stopped_by,
        first_loss=losses[0] if losses else float("nan"),
        final_loss=float(np.mean(tail)),
        losses=losses,
    )
