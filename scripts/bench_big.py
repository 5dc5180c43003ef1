#!/usr/bin/env python3
"""A decoder past 2 GiB through the HTTP API: streamed int4, the job's peak memory and time.

Builds a Llama-architecture decoder with random weights from a ``transformers`` config
(``tests.llm.random_llama``; default ~2.3 GB of float32, past what one protobuf holds; exported
with its KV cache unless ``--no-kv-cache``), saved as ``model.onnx`` + ``model.onnx.data``,
packs both into a tar, starts a local stack of its own (SeaweedFS S3, Redis, gunicorn API,
Celery worker; ``service.devstack``), uploads the archive with ``POST /v1/models``, runs
``int4_weight_only`` (rtn; embedding table int8 unless ``--embedding float``) on it, downloads
the result (``model.onnx`` + ``model.onnx.data``) and prints: the fp32 and output sizes, the
job's wall time by stage, and the engine process's peak memory as the worker measured it
(``VmHWM``; ``RssAnon`` / ``RssFile`` peaks, overall and per stage). The issue's bar: peak
worker RSS below half the float model's size; the script says whether it holds, and prints
what it measured either way.

The job evaluates the float original segment by segment (``service.engine.segments``: its
weights pass half the job's memory limit), so that it is never resident whole; the script
prints how, and the language-model metrics the job measured (on generated token ids: random
weights).

Evaluation runs on 16-token prompts (the job's ``inputs``) so that the float model's forward
passes stay a fraction of a second on a small host. The job runs under a memory limit
(``EDGEPRESS_JOB_MEMORY_LIMIT_MB``, the engine's ``RLIMIT_DATA``: its private writable memory)
of half the float model's size by default (``--memory-limit-mb``): the kernel, not this
script, enforces that the job never holds more than that of its own. The weights it reads are
shared read-only mappings of the files (page cache, counted in ``RssFile``, not in the limit).

Files go under ``--workdir`` (default: a temporary directory under the scratch disk, removed
at the end); it needs about 6x the model's size free.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench_output import machine_header, tee_to  # noqa: E402

# ~582 M parameters: 2.33 GB of float32 (2 GiB is 2.147 GB)
CONFIG = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
          "num_hidden_layers": 10, "num_attention_heads": 16, "num_key_value_heads": 4,
          "max_position_embeddings": 2048, "tie_word_embeddings": False}
PROMPT = 16


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--method", choices=["rtn", "gptq", "awq"], default="rtn",
                        help="int4 rounding; gptq/awq calibrate on a dataset of random token "
                        "sequences uploaded with the job (random weights: a memory and time "
                        "test, not a quality one)")
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--embedding", choices=["int8", "float"], default="int8",
                        help="the embedding table's precision (int4 tables do not stream); "
                        "a float table read through a mapping keeps whole page-cache folios "
                        "resident per token row looked up")
    parser.add_argument("--no-kv-cache", dest="kv_cache", action="store_false",
                        help="export without the KV cache (input_ids, attention_mask -> logits; "
                        "not evaluated as a language model)")
    parser.add_argument("--memory-limit-mb", type=int, default=None,
                        help="the job's memory limit (default: half the float model's size)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the table here after the machine header")
    args = parser.parse_args(argv)
    header = machine_header(
        "scripts/bench_big.py", sys.argv[1:] if argv is None else argv,
        threads="the engine's defaults (latency at 1 thread and the host's count), prompts of "
        f"{PROMPT} tokens, batch 1")
    with tee_to(args.out, header):
        return run(args)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import onnxruntime as ort

    from service.devstack import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, LocalStack, free_port
    from tests.e2e.client import Api
    from tests.llm import random_llama

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-big-"))
    work.mkdir(parents=True, exist_ok=True)
    config = {**CONFIG, "num_hidden_layers": args.layers}
    stack = None
    try:
        started = time.perf_counter()
        model = work / "src" / "model.onnx"
        data = model.with_name("model.onnx.data")
        reused = model.exists() and data.exists()  # --keep'd from an earlier run
        marker = work / "src" / "kv_cache.json"
        reused = reused and marker.exists() and json.loads(marker.read_text()) == args.kv_cache
        if not reused:
            shutil.rmtree(work / "src", ignore_errors=True)
            random_llama(work / "src", config, kv_cache=args.kv_cache)
            marker.write_text(json.dumps(args.kv_cache))
        fp32 = data.stat().st_size + model.stat().st_size
        archive = work / "decoder.tar"
        with tarfile.open(archive, "w") as tf:
            tf.add(model, "model.onnx")
            tf.add(data, "model.onnx.data")
        built = time.perf_counter() - started
        print(f"model: Llama {config['num_hidden_layers']} layers, hidden "
              f"{config['hidden_size']}, vocab {config['vocab_size']}, "
              + ("exported with its KV cache" if args.kv_cache else "no KV cache") + "; "
              f"{_mb(fp32)} float32 (model.onnx {_mb(model.stat().st_size)} + model.onnx.data), "
              + ("reused from --workdir" if reused else f"built and exported in {built:.0f} s"))

        limit_mb = args.memory_limit_mb or int(fp32 / 2 / 2**20)
        print(f"job memory limit (EDGEPRESS_JOB_MEMORY_LIMIT_MB, RLIMIT_DATA): {limit_mb:,} MB"
              + ("" if args.memory_limit_mb else ", half the float model"))
        stack = LocalStack(
            work / "stack", api_port=free_port(), worker_metrics_port=free_port(),
            bucket="edgepress-bench", prefix=f"big-{uuid.uuid4().hex[:12]}", own_redis=True,
            extra_env={
                "EDGEPRESS_AUTH": "open",
                "EDGEPRESS_SCRATCH_DIR": str(work / "scratch"),
                "EDGEPRESS_JOB_MEMORY_LIMIT_MB": str(limit_mb),
                "EDGEPRESS_JOB_MAX_OUTPUT_MB": str(int(3 * fp32 / 2**20)),
                "EDGEPRESS_WORKER_SOURCE_CACHE_MB": str(int(2 * fp32 / 2**20)),
                "EDGEPRESS_S3_ACCESS_KEY": os.environ.get("EDGEPRESS_S3_ACCESS_KEY",
                                                          DEFAULT_ACCESS_KEY),
                "EDGEPRESS_S3_SECRET_KEY": os.environ.get("EDGEPRESS_S3_SECRET_KEY",
                                                          DEFAULT_SECRET_KEY),
            },
        )
        (work / "scratch").mkdir(exist_ok=True)
        api = Api(stack.up().api_url)
        t0 = time.perf_counter()
        with open(archive, "rb") as fh:  # streamed; the answer comes after inspection
            resp = api.request("POST", "/v1/models?filename=decoder.tar", data=fh,
                               headers={"Content-Type": "application/octet-stream"},
                               timeout=1200)
        if resp.status_code not in (200, 201):
            print(f"upload refused: {resp.status_code} {resp.text[:500]}")
            return 1
        uploaded = resp.json()
        upload_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        inputs: dict = {"input_ids": {"shape": [1, PROMPT]}}
        if not args.kv_cache:
            inputs["attention_mask"] = {"shape": [1, PROMPT]}
        step = {"pass": "int4_weight_only", "block_size": args.block_size,
                "method": args.method, "embedding": args.embedding}
        extra: dict = {}
        if args.method != "rtn":
            n = args.calibration_samples
            ids = np.random.default_rng(1).integers(0, config["vocab_size"], (n, PROMPT))
            np.savez(work / "calibration.npz", input_ids=ids.astype(np.int64),
                     attention_mask=np.ones((n, PROMPT), np.int64))
            extra["dataset_id"] = api.upload_dataset(work / "calibration.npz")["id"]
            step["calibration_samples"] = n
        job = api.submit(model_id=uploaded["id"], device="host", inputs=inputs,
                         recipe=[step], **extra)
        done = api.wait(job["id"], timeout=1800)
        job_s = time.perf_counter() - t0
        if done["state"] != "succeeded":
            print(f"job {done['state']}: {json.dumps(done.get('error'))}")
            return 1
        result = done["result"]
        out = work / "out"
        out.mkdir(exist_ok=True)
        for name in ("model.onnx", "model.onnx.data"):
            api.download(done["id"], name, out / name)
        after = sum((out / n).stat().st_size for n in ("model.onnx", "model.onnx.data"))
        import onnx

        from service.engine.decoder import decoder_spec, prefill_feed

        ids = np.random.default_rng(0).integers(0, config["vocab_size"], (1, PROMPT))
        spec = decoder_spec(onnx.load(str(out / "model.onnx"), load_external_data=False))
        feed = (prefill_feed(spec, ids.astype(np.int64)) if spec is not None else
                {"input_ids": ids.astype(np.int64),
                 "attention_mask": np.ones((1, PROMPT), np.int64)})
        got = ort.InferenceSession(str(out / "model.onnx"),
                                   providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]

        memory = result["memory"]
        print()
        print("| what | value |")
        print("| --- | --- |")
        print(f"| float32 model (model.onnx + model.onnx.data) | {_mb(fp32)} |")
        print(f"| uploaded archive kept external (inspection) | "
              f"{_mb(uploaded['external_data_kept_bytes'])} |")
        print(f"| int4 output (model.onnx + model.onnx.data, downloaded) | {_mb(after)} "
              f"({fp32 / after:.2f}x smaller) |")
        print(f"| output runs in ONNX Runtime from the files | logits {list(got.shape)}, "
              f"finite: {bool(np.isfinite(got).all())} |")
        print(f"| job's min cosine vs float (generated prompts) | {result['min_cosine']:.4f} |")
        print(f"| upload (POST /v1/models, with inspection) | {upload_s:.0f} s |")
        print(f"| job, submit to succeeded | {job_s:.0f} s |")
        timings = result.get("timings_s") or {}
        print(f"| worker timings | {', '.join(f'{k} {v:.0f} s' for k, v in timings.items())} |")
        print(f"| engine peak RSS (VmHWM) | {memory['peak_rss_mb']:,.0f} MB |")
        print(f"| engine peak RssAnon (sampled) | {memory['peak_rss_anon_mb']:,.0f} MB |")
        print(f"| engine peak RssFile (sampled; mapped weight files) | "
              f"{memory['peak_rss_file_mb']:,.0f} MB |")
        print(f"| engine peak VmData (sampled; what RLIMIT_DATA counts) | "
              f"{memory['peak_vm_data_mb']:,.0f} MB |")
        print(f"| memory probes (child processes, own VmHWM: the output loaded alone) | "
              f"{memory['children_max_rss_mb']:,.0f} MB |")
        print(f"| engine RSS / VmData at start (preloaded libraries) | "
              f"{memory['start_rss_mb']:,.0f} MB / {memory['start_vm_data_mb']:,.0f} MB |")
        print()
        print("| stage | peak RSS | RssAnon | RssFile | VmData |")
        print("| --- | --- | --- | --- | --- |")
        for stage, v in memory["by_stage_mb"].items():
            print(f"| {stage} | {v['rss']:,.0f} MB | {v['anon']:,.0f} MB | {v['file']:,.0f} MB "
                  f"| {v['data']:,.0f} MB |")
        half = fp32 / 2 / 2**20
        print()
        print(f"bar: peak worker RSS below half the float model ({half:,.0f} MB): "
              f"VmHWM {memory['peak_rss_mb']:,.0f} MB -> "
              f"{'holds' if memory['peak_rss_mb'] < half else 'does NOT hold'}; "
              f"RssAnon {memory['peak_rss_anon_mb']:,.0f} MB -> "
              f"{'holds' if memory['peak_rss_anon_mb'] < half else 'does NOT hold'}; "
              f"VmData {memory['peak_vm_data_mb']:,.0f} MB -> "
              f"{'holds' if memory['peak_vm_data_mb'] < half else 'does NOT hold'}"
              + (f" (enforced: the job ran under RLIMIT_DATA {limit_mb:,} MB)"
                 if limit_mb <= half else ""))
        print(f"of VmHWM, file-backed (RssFile peak): {memory['peak_rss_file_mb']:,.0f} MB, pages "
              "of the float and int4 weight files mapped read-only and shared by the job's "
              "sessions (page cache; the kernel reclaims them under pressure and reads them "
              "again)")
        report = json.loads(api.download(done["id"], "report.json",
                                         work / "report.json").read_text())
        latency = report["latency"]
        if latency.get("original_measured"):
            seg = latency.get("original_segments") or {}
            print(f"float original evaluated in {seg.get('count')} segments of at most "
                  f"{_mb(seg.get('budget_bytes') or 0)} of weights (largest "
                  f"{_mb(seg.get('largest_weight_bytes') or 0)}), one resident at a time; its "
                  f"latency {latency['before_ms']:.1f} ms is the sum of its segments' (int4 "
                  f"{latency['after_ms']:.1f} ms whole, {latency['threads']} thread(s))")
        lm = report.get("lm")
        if lm and not lm.get("error"):
            print(f"language model (generated token ids, {lm['sequences']} x "
                  f"{lm['sequence_length']}): KLD {lm['kl_divergence']:.4f}, top-1 agreement "
                  f"{lm['top1_agreement']:.3f}; int4 prefill "
                  f"{lm['prefill_tokens_per_s_after']:.0f} tok/s, decode "
                  f"{lm['decode_tokens_per_s_after']:.1f} tok/s (KV cache on the host), its "
                  f"process peak {lm.get('peak_memory_mb_after') or 0:,.0f} MB; "
                  + (lm.get("original_unmeasured") or ""))
        notes = next((p["notes"] for p in done["result"].get("passes", []) or []
                      if p.get("pass") == "int4_weight_only"), None)
        if notes and notes.get("streaming_capture"):
            print(f"{args.method}: activations captured in {notes['streaming_capture']['runs']} "
                  "runs of the float model")
        stream = memory["by_stage_mb"].get("pass:int4_weight_only")
        if stream:
            print(f"while the pass streamed: peak RSS {stream['rss']:,.0f} MB, RssAnon "
                  f"{stream['anon']:,.0f} MB ({stream['anon'] / (fp32 / 2**20):.2f}x the float "
                  "model)")
        return 0
    finally:
        if stack is not None:
            stack.stop_started()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
