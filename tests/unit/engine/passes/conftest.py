"""Fixtures for the quantization pass tests: the PyTorch corpus (built once per session) and a
small toolkit to run a pass and compare a model's outputs with ONNX Runtime."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from service.engine.normalise import normalise
from service.engine.registry import PassContext, get_pass
from tests import corpus


@pytest.fixture(scope="session")
def corpus_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the corpus is built: pytest's cache (kept between runs, keyed by the corpus source
    and the torch version so a change rebuilds), else a fresh session directory."""
    cache = getattr(request.config, "cache", None)
    if cache is None:  # -p no:cacheprovider
        return tmp_path_factory.mktemp("corpus")
    import torch

    key = hashlib.sha256(Path(corpus.__file__).read_bytes() + torch.__version__.encode())
    return Path(cache.mkdir(f"edgepress_corpus_{key.hexdigest()[:12]}"))


@pytest.fixture(scope="session")
def digits(corpus_dir: Path) -> corpus.CorpusModel:
    return corpus.digits_cnn(corpus_dir)


@pytest.fixture(scope="session")
def lstm(corpus_dir: Path) -> corpus.CorpusModel:
    return corpus.lstm_model(corpus_dir)


@pytest.fixture(scope="session")
def gru(corpus_dir: Path) -> corpus.CorpusModel:
    return corpus.gru_model(corpus_dir)


@pytest.fixture(scope="session")
def transformer(corpus_dir: Path) -> corpus.CorpusModel:
    return corpus.transformer_encoder(corpus_dir)


@pytest.fixture(scope="session")
def dynamic_dims(corpus_dir: Path) -> corpus.CorpusModel:
    return corpus.dynamic_dims_model(corpus_dir)


@dataclass
class PassRun:
    model: onnx.ModelProto
    notes: dict[str, Any]


class Toolkit:
    """Run a registered pass the way the pipeline does, and compare outputs."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._count = 0

    def load(self, source: corpus.CorpusModel | onnx.ModelProto) -> onnx.ModelProto:
        """A normalised model, as the pipeline hands it to passes."""
        proto = onnx.load(str(source.path)) if isinstance(source, corpus.CorpusModel) else source
        return normalise(proto)[0]

    def run(
        self,
        name: str,
        model: onnx.ModelProto,
        dataset: dict[str, np.ndarray] | None = None,
        **config: Any,
    ) -> PassRun:
        cls = get_pass(name)
        self._count += 1
        workdir = self.workdir / f"{self._count:02d}_{name}"
        workdir.mkdir(parents=True)
        ctx = PassContext(workdir=workdir, dataset=dataset)
        out = cls().run(model, cls.config_model.model_validate(config), ctx)
        onnx.checker.check_model(out)
        return PassRun(out, ctx.notes)

    @staticmethod
    def outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import onnxruntime as ort

        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        return session.run(None, feeds)

    @staticmethod
    def min_cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
        """Lowest per-sample cosine similarity over all outputs."""
        worst = 1.0
        for x, y in zip(a, b, strict=True):
            x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
            y = np.asarray(y, np.float64).reshape(y.shape[0], -1)
            cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)
            worst = min(worst, float(cos.min()))
        return worst

    @staticmethod
    def ratio(before: onnx.ModelProto, after: onnx.ModelProto) -> float:
        return before.ByteSize() / after.ByteSize()

    @staticmethod
    def ops(model: onnx.ModelProto) -> dict[str, int]:
        from service.engine.graph import op_histogram

        return op_histogram(model)


@pytest.fixture
def kit(tmp_path: Path) -> Toolkit:
    return Toolkit(tmp_path)


@pytest.fixture
def first(request: pytest.FixtureRequest) -> Callable[[dict[str, np.ndarray], int], dict]:
    """Slice every array of a feed dict to its first ``n`` samples."""

    def take(feeds: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        return {k: v[:n] for k, v in feeds.items()}

    return take
