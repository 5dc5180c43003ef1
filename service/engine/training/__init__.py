"""Training shared by the passes that learn weights (distill, recovery rounds, QAT).

- ``bridge.OnnxModule``: an ONNX graph executed as a torch module; ``write_back`` puts the
  learned weights into the ONNX initializers (same graph, no re-export).
- ``loop.train`` / ``loop.TrainingBudget``: the one CPU training loop (steps + seconds budgets,
  progress, cancellation, seeded).
- ``distillation``: teacher outputs via ONNX Runtime, KL/CE/feature losses, dataset and
  student/teacher validation.
- ``graph``: light ONNX helpers (initializers, consumers, MAC counting) also used by the
  pruning passes; it imports only onnx and numpy.

Import ``bridge``, ``loop`` and ``distillation`` only inside a pass's ``run`` (they import torch).
"""
