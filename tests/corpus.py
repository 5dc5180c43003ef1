"""The PyTorch-export test corpus: small, real models built (and trained) by the tests themselves.

Every builder takes a cache directory, exports its model there once with ``torch.onnx.export``
(dynamo exporter) and returns a :class:`CorpusModel` ``(path, inputs, labels)``:

- ``path``: the exported ``.onnx`` file (float32, weights as initializers, opset 18);
- ``inputs``: evaluation inputs keyed by model input name (first axis = samples);
- ``labels``: integer labels aligned with ``inputs`` (classifiers trained on real data) or None.

``CorpusModel.calibration`` gives separate calibration inputs (the digits training split for the
CNN, seeded random data otherwise) and ``CorpusModel.info`` the builder's facts (e.g. the float
test accuracy of the digits CNN). A second call with the same cache directory reuses the files,
so a pytest session or a benchmark builds each model once.

This module holds no pytest fixtures so that ``scripts/bench_engine.py`` and other helpers can
import it; the fixtures live in ``tests/unit/engine/passes/conftest.py``. torch and scikit-learn
are imported inside the builders.

Public names (kept stable): ``CorpusModel``, ``digits_cnn``, ``lstm_model``, ``gru_model``,
``transformer_encoder``, ``dynamic_dims_model``, ``BUILDERS``, ``build_all``, ``load_digits_split``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

SEED = 0


class CorpusModel(NamedTuple):
    """One exported corpus model: ``(path, inputs, labels)`` plus sidecar facts."""

    path: Path
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def info(self) -> dict[str, Any]:
        """Facts written by the builder (architecture, float accuracy, input names...)."""
        return json.loads(self.path.with_suffix(".json").read_text())

    @property
    def calibration(self) -> dict[str, np.ndarray]:
        """Calibration inputs keyed by input name, distinct from the evaluation inputs."""
        with np.load(self.path.with_suffix(".npz"), allow_pickle=False) as data:
            return {k[len("calib__") :]: data[k] for k in data.files if k.startswith("calib__")}


# --------------------------------------------------------------------------- helpers


def _cached(cache_dir: Path, name: str) -> CorpusModel | None:
    path = Path(cache_dir) / f"{name}.onnx"
    side = path.with_suffix(".npz")
    if not (path.exists() and side.exists() and path.with_suffix(".json").exists()):
        return None
    return _load(path)


def _load(path: Path) -> CorpusModel:
    with np.load(path.with_suffix(".npz"), allow_pickle=False) as data:
        inputs = {k[len("eval__") :]: data[k] for k in data.files if k.startswith("eval__")}
        labels = data["labels"] if "labels" in data.files else None
    return CorpusModel(path, inputs, labels)


def _save(
    cache_dir: Path,
    name: str,
    module: Any,
    example: tuple[Any, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic: dict[str, dict[int, str]],
    inputs: dict[str, np.ndarray],
    calibration: dict[str, np.ndarray],
    labels: np.ndarray | None,
    info: dict[str, Any],
) -> CorpusModel:
    """Export ``module`` to ``cache_dir/name.onnx`` and write its sidecars atomically-ish."""
    import torch

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{name}.onnx"
    tmp = cache_dir / f".{name}.tmp.onnx"
    module = module.eval()
    shapes = {
        n: {axis: torch.export.Dim(f"{n}_{label}") for axis, label in axes.items()}
        for n, axes in dynamic.items()
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                example,
                str(tmp),
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                # positional: dynamic_shapes keys would have to be forward()'s argument names
                dynamic_shapes=tuple(shapes.get(n) for n in input_names) if dynamic else None,
                external_data=False,
                verbose=False,
            )
            info["exporter"] = "dynamo"
        except Exception as exc:  # the dynamo exporter is young: fall back, and say so
            torch.onnx.export(
                module,
                example,
                str(tmp),
                dynamo=False,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes={n: dict(a) for n, a in dynamic.items()},
                opset_version=17,
            )
            info["exporter"] = (
                f"torchscript (dynamo failed: {type(exc).__name__}: {str(exc)[:300]})"
            )
    # The dynamo exporter may write weights next to the file; make one self-contained file.
    import onnx

    proto = onnx.load(str(tmp), load_external_data=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    for stray in cache_dir.glob(f".{name}.tmp.onnx*"):
        stray.unlink()
    arrays = {f"eval__{k}": v for k, v in inputs.items()}
    arrays.update({f"calib__{k}": v for k, v in calibration.items()})
    if labels is not None:
        arrays["labels"] = labels
    np.savez(path.with_suffix(".npz"), **arrays)  # type: ignore[arg-type]
    info.update({"input_names": input_names, "output_names": output_names})
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return _load(path)


# --------------------------------------------------------------------------- digits CNN


def load_digits_split(upsample: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as NCHW float32 in [0, 1], upsampled ``upsample``x (nearest).

    Returns ``(x_train, y_train, x_test, y_test)`` with a fixed 80/20 stratified split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    if upsample > 1:
        images = np.kron(images, np.ones((1, upsample, upsample), dtype=np.float32))
    x = images[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=SEED, stratify=y)
    return x_tr, y_tr, x_te, y_te


def digits_cnn(cache_dir: Path) -> CorpusModel:
    """A 4-conv CNN (32-64-64-128 channels, 16x16 input) trained on digits for a few seconds.

    Trained with BatchNorm, exported with BatchNorm folded into the convolutions.

    Channel counts are large enough that int8 convolution kernels pay off at batch 1. Input
    ``image`` [batch, 1, 16, 16] (dynamic batch), output ``logits`` [batch, 10]. ``info`` holds
    ``test_accuracy`` of the float model (the 360-image test split = the evaluation inputs).
    """
    cached = _cached(cache_dir, "digits_cnn")
    if cached is not None:
        return cached
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    x_tr, y_tr, x_te, y_te = load_digits_split()

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    model = nn.Sequential(
        *block(1, 32),
        *block(32, 64),
        nn.MaxPool2d(2),
        *block(64, 64),
        nn.MaxPool2d(2),
        *block(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(SEED)
    epochs = 5
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 32):
            idx = perm[i : i + 32]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    # Fold BatchNorm into the convolutions, as a deployment export does: Conv+Relu remain.
    layers = list(model)
    fused: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, nn.BatchNorm2d):
            fused[-1] = nn.utils.fusion.fuse_conv_bn_eval(fused[-1], layer)  # type: ignore[type-var]
        else:
            fused.append(layer)
    model = nn.Sequential(*fused).eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    rng = np.random.default_rng(SEED)
    calib_idx = rng.choice(len(x_tr), size=128, replace=False)
    return _save(
        cache_dir,
        "digits_cnn",
        model,
        (torch.from_numpy(x_te[:2]),),  # batch 1 would be specialised by torch.export
        ["image"],
        ["logits"],
        {"image": {0: "batch"}},
        {"image": x_te},
        {"image": x_tr[calib_idx]},
        y_te,
        {"test_accuracy": acc, "epochs": epochs, "input_hw": [16, 16]},
    )


# --------------------------------------------------------------------------- recurrent models


def _recurrent(cache_dir: Path, name: str, cell: str) -> CorpusModel:
    cached = _cached(cache_dir, name)
    if cached is not None:
        return cached
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    features, hidden, layers, seq = 64, 256, 2, 24

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
            self.rnn = rnn_cls(features, hidden, num_layers=layers, batch_first=True)
            self.head = nn.Linear(hidden, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            y, state = self.rnn(x)
            logits = self.head(y[:, -1])
            if isinstance(state, tuple):
                return logits, state[0], state[1]
            return logits, state

    outputs = ["logits", "h_n", "c_n"] if cell == "lstm" else ["logits", "h_n"]
    rng = np.random.default_rng(SEED)
    # Smooth sequences (random walks) look more like real signals than white noise.
    x_eval = np.cumsum(rng.normal(0, 0.3, size=(32, seq, features)), axis=1).astype(np.float32)
    x_cal = np.cumsum(rng.normal(0, 0.3, size=(64, seq, features)), axis=1).astype(np.float32)
    return _save(
        cache_dir,
        name,
        Recurrent(),
        (torch.from_numpy(x_eval[:2]),),
        ["sequence"],
        outputs,
        {"sequence": {0: "batch", 1: "seq"}},
        {"sequence": x_eval},
        {"sequence": x_cal},
        None,
        {"cell": cell, "features": features, "hidden": hidden, "layers": layers, "seq": seq},
    )


def lstm_model(cache_dir: Path) -> CorpusModel:
    """2-layer LSTM (64 -> 256) + linear head; outputs ``logits``, ``h_n``, ``c_n`` (states)."""
    return _recurrent(cache_dir, "lstm_model", "lstm")


def gru_model(cache_dir: Path) -> CorpusModel:
    """2-layer GRU (64 -> 256) + linear head; outputs ``logits`` and the state ``h_n``."""
    return _recurrent(cache_dir, "gru_model", "gru")


# --------------------------------------------------------------------------- transformer


def transformer_encoder(cache_dir: Path) -> CorpusModel:
    """A MatMul-heavy encoder: d_model 256, 4 layers, 4 heads, FFN 1024 (~3.2 M weights).

    Written out by hand (no fused fast path) so that the export is plain MatMul/Softmax/
    LayerNormalization. Input ``features`` [batch, seq, 256] with dynamic batch and sequence,
    output ``encoded`` [batch, seq, 256]. Weights dominate the file (≈12.6 MB float32).
    """
    cached = _cached(cache_dir, "transformer_encoder")
    if cached is not None:
        return cached
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    d_model, heads, ffn, depth, seq = 256, 4, 1024, 4, 32

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(d_model, 3 * d_model)
            self.proj = nn.Linear(d_model, d_model)
            self.norm1 = nn.LayerNorm(d_model)
            self.norm2 = nn.LayerNorm(d_model)
            self.ff1 = nn.Linear(d_model, ffn)
            self.ff2 = nn.Linear(ffn, d_model)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
            q = q.reshape(b, t, heads, -1).transpose(1, 2)
            k = k.reshape(b, t, heads, -1).transpose(1, 2)
            v = v.reshape(b, t, heads, -1).transpose(1, 2)
            att = torch.softmax(q @ k.transpose(-1, -2) / (d_model // heads) ** 0.5, dim=-1)
            y = (att @ v).transpose(1, 2).reshape(b, t, d_model)
            x = x + self.proj(y)
            return x + self.ff2(nn.functional.gelu(self.ff1(self.norm2(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.norm = nn.LayerNorm(d_model)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return self.norm(x)

    rng = np.random.default_rng(SEED)
    x_eval = rng.normal(0, 1, size=(16, seq, d_model)).astype(np.float32)
    x_cal = rng.normal(0, 1, size=(32, seq, d_model)).astype(np.float32)
    return _save(
        cache_dir,
        "transformer_encoder",
        Encoder(),
        (torch.from_numpy(x_eval[:2]),),
        ["features"],
        ["encoded"],
        {"features": {0: "batch", 1: "seq"}},
        {"features": x_eval},
        {"features": x_cal},
        None,
        {"d_model": d_model, "heads": heads, "ffn": ffn, "depth": depth, "seq": seq},
    )


# --------------------------------------------------------------------------- dynamic dims


def dynamic_dims_model(cache_dir: Path) -> CorpusModel:
    """A token-classifier (Conv1d + 2 Linear) with dynamic batch AND sequence dims.

    Input ``tokens`` [batch, seq, 96] float, output ``scores`` [batch, seq, 12]. Evaluation
    inputs use a sequence length (40) different from the export example (17) on purpose.
    """
    cached = _cached(cache_dir, "dynamic_dims_model")
    if cached is not None:
        return cached
    import torch
    from torch import nn

    torch.manual_seed(SEED)

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(96, 192, 3, padding=1)
            self.fc1 = nn.Linear(192, 384)
            self.fc2 = nn.Linear(384, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
            return self.fc2(torch.relu(self.fc1(h)))

    rng = np.random.default_rng(SEED)
    x_example = rng.normal(0, 1, size=(3, 17, 96)).astype(np.float32)
    x_eval = rng.normal(0, 1, size=(8, 40, 96)).astype(np.float32)
    x_cal = rng.normal(0, 1, size=(16, 40, 96)).astype(np.float32)
    return _save(
        cache_dir,
        "dynamic_dims_model",
        Tagger(),
        (torch.from_numpy(x_example),),
        ["tokens"],
        ["scores"],
        {"tokens": {0: "batch", 1: "seq"}},
        {"tokens": x_eval},
        {"tokens": x_cal},
        None,
        {"export_example_shape": list(x_example.shape)},
    )


BUILDERS: dict[str, Callable[[Path], CorpusModel]] = {
    "digits_cnn": digits_cnn,
    "lstm_model": lstm_model,
    "gru_model": gru_model,
    "transformer_encoder": transformer_encoder,
    "dynamic_dims_model": dynamic_dims_model,
}


def build_all(cache_dir: Path) -> dict[str, CorpusModel]:
    """Build (or reuse) every corpus model under ``cache_dir``."""
    return {name: build(cache_dir) for name, build in BUILDERS.items()}
