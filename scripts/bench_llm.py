"""Benchmark int4 on a small decoder LLM, side by side, judged as a language model.

The byte-level Llama decoder of ``tests/llm.py`` (trained here on the Python standard
library's sources, exported with its KV cache): ``--model small`` (the default, the tests'
2.76 MB model) or ``--model wide`` (38.8 MB, the size of the issue's example LM; trained on
first use, 5-10 minutes on 2 cores, then cached). Rows, in one run: fp32; ONNX Runtime's
``MatMulNBitsQuantizer`` as is (round-to-nearest int4, block 32 and 128); EdgePress's
``int4_weight_only`` pass (its default, block 32 and block 128, and each ``method`` its config
accepts: "not available in this build" when it has none); and ``recipe: "auto"`` for
``raspberry_pi_5`` with objective size and a dataset of token sequences.

Every row is measured the same way, by ``service.engine.lm.evaluate_lm`` against the fp32
file on held-out sequences no job saw (the last ``--eval`` of the held-out set; jobs get the
first ones as their dataset): size ratio (file bytes), perplexity and next-token KL divergence,
top-1 agreement, prefill and decode tokens/s (KV cache on the host, interleaved with fp32,
medians), peak RSS of a process running only that model.

    .venv/bin/python scripts/bench_llm.py --out docs/bench/llm.txt
    .venv/bin/python scripts/bench_llm.py --model wide --rounds 5 --out docs/bench/llm_wide.txt

Exits 1 when a row errored.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from bench_output import machine_header, tee_to  # noqa: E402

from tests import llm  # noqa: E402

THREADS = 1
ROUNDS = 5
DECODE_TOKENS = 32


def _ort_rtn(source: Path, target: Path, block: int) -> Path:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), block_size=block,
                                     is_symmetric=True)
    quantizer.process()
    onnx.save(quantizer.model.model, str(target))
    return target


def _recipe(source: Path, workdir: Path, steps: list[dict], dataset: Path) -> Path:
    from service.engine.recipe import run_recipe

    return run_recipe(source, steps, workdir, dataset_path=dataset).model_path


FRONTS: dict[str, dict] = {}  # auto rows' Pareto fronts, printed after the table


def _auto(source: Path, workdir: Path, dataset: Path, objective: str) -> tuple[Path, str]:
    from service.engine.search.run import run_auto

    result = run_auto(source, workdir, dataset_path=dataset, device="raspberry_pi_5",
                      constraints={"objective": objective})
    auto = result.report["auto"]
    FRONTS[objective] = {"front": auto.get("pareto_front") or {},
                         "ran": [c["name"] for c in auto["candidates"] if c["status"] == "ok"],
                         "stop": (auto.get("early_stop") or {}).get("reason")}
    return result.model_path, str((result.summary.get("auto") or {}).get("candidate"))


def _variants(source: Path, work: Path, dataset: Path) -> list[tuple[str, Any]]:
    from service.engine.registry import registered_passes

    rows: list[tuple[str, Any]] = [
        ("fp32", lambda: source),
        ("ORT RTN int4 block 32", lambda: _ort_rtn(source, work / "rtn32.onnx", 32)),
        ("ORT RTN int4 block 128", lambda: _ort_rtn(source, work / "rtn128.onnx", 128)),
    ]
    config = registered_passes()["int4_weight_only"].config_model
    default_block = config.model_fields["block_size"].default
    rows.append((f"int4_weight_only (default: block {default_block})",
                 lambda: _recipe(source, work / "p_default", [{"pass": "int4_weight_only"}],
                                 dataset)))
    for block in (32, 128):
        rows.append((f"int4_weight_only block {block}",
                     lambda block=block: _recipe(  # type: ignore[misc]
                         source, work / f"p{block}",
                         [{"pass": "int4_weight_only", "block_size": block}], dataset)))
    field = config.model_fields.get("method")
    methods = _choices(field.annotation) if field is not None else []
    if not methods:
        rows.append(("int4_weight_only method=...", "not available in this build (the pass's "
                     "config has no `method` field)"))
    for method in methods:
        rows.append((f"int4_weight_only method={method}",
                     lambda method=method: _recipe(  # type: ignore[misc]
                         source, work / f"m_{method}",
                         [{"pass": "int4_weight_only", "method": method}], dataset)))
    # What auto plans for a decoder with a dataset (block 128, embedding int8), and the mixed
    # int4/int8 option (the most sensitive MatMuls, up to 10 % of the weights, at int8).
    for label, options in (
            ("gptq block 128, emb int8", {"method": "gptq", "block_size": 128}),
            ("rtn block 128 + int8 10 %, emb int8", {"block_size": 128, "int8_share": 0.1}),
            ("gptq block 128 + int8 10 %, emb int8",
             {"method": "gptq", "block_size": 128, "int8_share": 0.1})):
        if "int8_share" in options and "int8_share" not in config.model_fields:
            rows.append((f"int4_weight_only {label}", "not available in this build"))
            continue
        rows.append((f"int4_weight_only {label}",
                     lambda options=options, label=label: _recipe(  # type: ignore[misc]
                         source, work / f"x_{abs(hash(label))}",
                         [{"pass": "int4_weight_only", "embedding": "int8", **options}],
                         dataset)))
    for objective in ("size", "balanced"):
        rows.append((f"auto raspberry_pi_5 {objective}",
                     lambda objective=objective: _auto(  # type: ignore[misc]
                         source, work / f"auto_{objective}", dataset, objective)))
    return rows


def _bytes_split(path: Path) -> tuple[int, int]:
    """(tensor bytes: initializers, graph bytes: everything else in the file)."""
    import onnx

    model = onnx.load(str(path))
    tensors = sum(t.ByteSize() for t in model.graph.initializer)
    return tensors, path.stat().st_size - tensors


def _zstd_bytes(path: Path) -> int:
    """Bytes of ``path`` zstd-compressed at the level run_recipe stores artifacts with (what
    auto's size objective ranks, where it saves 10 %: ``bytes_stored``)."""
    import zstandard

    from service.engine.recipe import ZSTD_LEVEL

    return len(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(path.read_bytes()))


def _choices(annotation: Any) -> list[str]:
    from typing import get_args

    return [a for a in get_args(annotation) if isinstance(a, str)]


def _fronts(size0: int) -> None:
    for objective, entry in FRONTS.items():
        front = entry["front"]
        print(f"\nauto ({objective}) ran {', '.join(entry['ran'])}"
              + (f"; stopped: {entry['stop']}" if entry["stop"] else ""))
        print(f"  Pareto front ({(front.get('axes') or {}).get('front', 'size, latency')}; "
              "tokens/s and KLD as auto measured them on its held-out split):")
        for p in sorted(front.get("points") or [], key=lambda p: p["size_mb"]):
            tokens, kld = p.get("decode_tokens_per_s"), p.get("kl_divergence")
            print(f"  {'*' if p.get('on_front') else ' '} {p['candidate']:<26} "
                  f"{size0 / 1e6 / p['size_mb']:>5.2f}x "
                  f"{'-' if tokens is None else f'{tokens:.0f}':>7} t/s  KLD "
                  f"{'-' if kld is None else f'{kld:.5f}'}"
                  + ("  (chosen)" if p.get("chosen") else ""))


def _bars(results: dict[str, dict], size0: int, tensors0: int, graph0: int,
          nodes0: int) -> None:
    """The issue's bar for auto: >= 6.5x smaller with KLD at or below ORT RTN block 32's,
    perplexity within 5 % of fp32, decode faster than fp32."""
    rtn32 = results.get("ORT RTN int4 block 32")
    for name in ("auto raspberry_pi_5 size", "auto raspberry_pi_5 balanced"):
        r = results.get(name)
        if r is None or rtn32 is None:
            continue
        print(f"\nbar for {name}:")
        checks = [(r["ratio"] >= 6.5, f">= 6.5x smaller: {r['ratio']:.2f}x (file bytes)"),
                  (r["kl_divergence"] <= rtn32["kl_divergence"],
                   f"KLD {r['kl_divergence']:.5f} <= RTN block 32's "
                   f"{rtn32['kl_divergence']:.5f}"),
                  (abs(r["perplexity_increase"]) <= 0.05,
                   f"perplexity within 5 % of fp32: {r['perplexity_increase'] * 100:+.2f} %"),
                  (r["speed"] > 1.0, f"decode faster than fp32: {r['speed']:.2f}x")]
        for ok, text in checks:
            print(f"  {'PASS' if ok else 'FAIL'} {text}")
    for name in ("auto raspberry_pi_5 size", "auto raspberry_pi_5 balanced"):
        r = results.get(name)
        if r is None:
            continue
        room = size0 / 6.5 - r["graph"]
        bits = 8 * room / (tensors0 / 4)
        print(f"\nwhere the bytes go ({name}): fp32 = {tensors0} tensor bytes + {graph0} graph "
              f"bytes ({100 * graph0 / size0:.1f} % of the file: {nodes0} nodes, their names and "
              f"shapes); auto's file = {r['tensors']} tensor + {r['graph']} graph bytes. 6.5x "
              f"needs <= {size0 / 6.5:.0f} bytes; the graph alone leaves {room:.0f} for the "
              f"weights, {bits:.2f} bits per weight, "
              + ("under int4's 4 bits before any scale" if bits < 4 else
                 "room for int4 and its scales (4 + 32/128 = 4.25 bits at block 128)")
              + f": the tensors are {tensors0 / r['tensors']:.2f}x smaller")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "edgepress_llm")
    parser.add_argument("--model", choices=sorted(llm.SIZES), default="small",
                        help="which tests/llm.py byte-level Llama (tests.llm.SIZES)")
    parser.add_argument("--eval", type=int, default=16, help="held-out sequences evaluated")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help="interleaved speed rounds per row (medians)")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the printed table here, after the machine header")
    args = parser.parse_args(argv)
    header = machine_header(
        "scripts/bench_llm.py", sys.argv[1:] if argv is None else argv,
        threads=f"{THREADS} intra-op thread; tokens/s: medians of {args.rounds} rounds interleaved "
        f"with fp32, a 64-token prefill and {DECODE_TOKENS} decode steps")
    with tee_to(args.out, header):
        return run(args)


def run(args: argparse.Namespace) -> int:
    from service.engine.decoder import decoder_spec
    from service.engine.lm import evaluate_lm

    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    model = llm.byte_llama(args.cache_dir, size=args.model)
    info = model.info
    import onnx

    proto = onnx.load(str(model.path))
    spec = decoder_spec(proto)
    nodes0 = len(proto.graph.node)
    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    del proto
    assert spec is not None
    held = model.heldout
    eval_ids, job_ids = held[-args.eval:], held[:-args.eval]
    size0 = model.path.stat().st_size
    cfg = info["config"]
    print(f"model: {args.model!r}: byte-level Llama ({cfg['num_hidden_layers']} layers, hidden "
          f"{cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, "
          f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV heads, "
          f"{params / 1e6:.2f} M parameters, {size0 / 1e6:.2f} MB fp32), {info['steps']} "
          f"training steps of batch {info['batch']} ({info['train_seconds']} s) on "
          f"{info['train_bytes']} bytes of stdlib sources")
    if "first_train_loss" in info:
        print(f"training: loss {info['first_train_loss']:.3f} -> {info['last_train_loss']:.3f} "
              "nats/byte (first step; mean of the last 10); held-out loss "
              f"{info['heldout_loss']:.3f} (perplexity {info['heldout_perplexity']:.2f}; "
              f"untrained: ln 256 = {np.log(256):.2f}) on the first 16 held-out sequences")
    print(f"evaluation: {len(eval_ids)} held-out sequences of {eval_ids.shape[1]} tokens "
          f"(files never trained on, sequences no job saw); jobs' dataset: {len(job_ids)} "
          "other held-out sequences\n")
    failed = 0
    header = (f"{'variant':<53} {'size':>6} {'zstd':>6} {'wts':>6} {'ppl':>7} {'KLD':>8} "
              f"{'top1':>6} "
              f"{'prefill t/s':>11} {'decode t/s':>10} {'x fp32':>6} {'peak MB':>7}")
    tensors0, graph0 = _bytes_split(model.path)
    results: dict[str, dict] = {}
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="bench_llm_") as tmp:
        work = Path(tmp)
        dataset = work / "tokens.npz"
        np.savez(dataset, input_ids=job_ids)
        for name, make in _variants(model.path, work, dataset):
            if isinstance(make, str):
                print(f"{name:<53} {make}")
                continue
            try:
                made = make()
                path, note = made if isinstance(made, tuple) else (made, "")
                r = evaluate_lm(model.path, path, spec, eval_ids, threads=THREADS,
                                rounds=args.rounds, decode_tokens=DECODE_TOKENS,
                                max_sequences=len(eval_ids))
            except Exception as exc:  # a failed row is printed and fails the run
                failed += 1
                print(f"{name:<53} ERROR {type(exc).__name__}: {str(exc)[:120]}")
                traceback.print_exc(limit=2, file=sys.stderr)
                continue
            ratio = size0 / path.stat().st_size
            speed = r["decode_tokens_per_s_after"] / r["decode_tokens_per_s_before"]
            tensors, graph = _bytes_split(path)
            zstd = size0 / _zstd_bytes(path)
            results[name] = {**r, "ratio": ratio, "speed": speed, "graph": graph,
                             "tensors": tensors, "zstd": zstd}
            print(f"{name:<53} {ratio:>5.2f}x {zstd:>5.2f}x {tensors0 / tensors:>5.2f}x "
                  f"{r['perplexity_after']:>7.3f} "
                  f"{r['kl_divergence']:>8.5f} {r['top1_agreement']:>6.4f} "
                  f"{r['prefill_tokens_per_s_after']:>11.0f} "
                  f"{r['decode_tokens_per_s_after']:>10.1f} {speed:>5.2f}x "
                  f"{r['peak_memory_mb_after']:>7.1f}" + (f"  (chose {note})" if note else ""))
    own = results.get("fp32")
    if own is not None:
        print(f"\nnoise: fp32 against itself decoded at {own['speed']:.2f}x in the same "
              "interleaved rounds; the host's 2 cores were shared with other jobs during this "
              "run, so read tokens/s ratios within that band")
    _fronts(size0)
    _bars(results, size0, tensors0, graph0, nodes0)
    print("\nsize: fp32 file bytes / variant file bytes (the bar's measure). zstd: fp32 file "
          "bytes / the variant's file zstd-compressed (level 9, as run_recipe stores it; auto's "
          "size objective ranks candidates by these stored bytes where zstd saves 10 %). wts: "
          "fp32 tensor (initializer) bytes / the variant's (the file less its graph: nodes, "
          "names, shapes). ppl: perplexity of the held-out bytes (targets: the sequences "
          "shifted by one). KLD: mean next-token KL(fp32 || variant), nats. top1: next-token argmax agreement with fp32. x fp32: decode tokens/s over "
          "fp32's in the same interleaved rounds. peak MB: VmHWM of a fresh process that loads "
          "only that model and runs the prefill and decode loop.")
    if failed:
        print(f"FAILED: {failed} row(s) errored")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
