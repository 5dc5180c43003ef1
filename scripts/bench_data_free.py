"""Benchmark data-free static int8 calibration across models, not one lucky model.

For each seed, a BatchNorm CNN (``tests.real_exports.bn_digits_cnn``: scikit-learn's digits,
16x16, two epochs, BatchNorm kept) is trained from that seed and quantized with EdgePress's
``quantize_static`` (per-channel QDQ, u8 activations, minmax) calibrated four ways:

- ``noise``: the generated inputs as they are (``data_free="noise"``);
- ``BN only``: ZeroQ's distilled data, BatchNorm statistics alone (``data_free_labels=False``);
- ``BN + labels``: the default, the BatchNorm term plus a target class per distilled sample on
  the logits;
- ``32 real``: 32 images of the digits train split (a calibration set, for reference).

Each cell is the top-1 agreement with the float model on the digits test split (360 images
that neither training nor calibration saw), and the mean cosine of the logits beside it. The
last rows give the minimum and the mean over seeds.

    .venv/bin/python scripts/bench_data_free.py --out docs/bench/data_free.txt
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from bench_output import machine_header, tee_to  # noqa: E402

COLUMNS = ("noise", "BN only", "BN + labels", "32 real")


def _run(model, dataset, workdir: Path, **config):  # type: ignore[no-untyped-def]
    from service.engine.registry import PassContext, get_pass

    cls = get_pass("quantize_static")
    workdir.mkdir(parents=True)
    ctx = PassContext(workdir=workdir, dataset=dataset)
    return cls().run(model, cls.config_model.model_validate(config), ctx)


def _agreement(original, quantized, images: np.ndarray) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    def logits(model) -> np.ndarray:  # type: ignore[no-untyped-def]
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return session.run(None, {"image": images})[0]

    ref, out = logits(original), logits(quantized)
    cos = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    return float(np.mean(ref.argmax(1) == out.argmax(1))), float(cos.mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 0, 1, 2, 4, 5, 6, 7])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import onnx

    from service.engine.normalise import normalise
    from tests.real_exports import bn_digits_cnn

    header = machine_header("scripts/bench_data_free.py", sys.argv[1:],
                            "ONNX Runtime defaults (all cores)")
    with tee_to(args.out, header), tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("top-1 agreement with the float model on the digits test split (360 images), "
              "mean logit cosine in brackets")
        print(f"{'seed':>4}  " + "  ".join(f"{c:>18}" for c in COLUMNS))
        table: list[list[float]] = []
        for seed in args.seeds:
            path, train, test = bn_digits_cnn(work / f"bn{seed}.onnx", seed=seed)
            model = normalise(onnx.load(str(path)))[0]  # as the pipeline hands it to passes
            picks = np.random.default_rng(0).choice(len(train), 32, replace=False)
            runs = {
                "noise": _run(model, None, work / f"{seed}n", data_free="noise"),
                "BN only": _run(model, None, work / f"{seed}b", data_free_labels=False),
                "BN + labels": _run(model, None, work / f"{seed}l"),
                "32 real": _run(model, {"image": train[picks]}, work / f"{seed}r"),
            }
            cells = [_agreement(model, runs[c], test) for c in COLUMNS]
            table.append([top for top, _ in cells])
            print(f"{seed:>4}  " + "  ".join(f"{top:>8.3f} ({cos:.4f})" for top, cos in cells),
                  flush=True)
        values = np.array(table)
        print(f"{'min':>4}  " + "  ".join(f"{v:>18.3f}" for v in values.min(0)))
        print(f"{'mean':>4}  " + "  ".join(f"{v:>18.3f}" for v in values.mean(0)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
