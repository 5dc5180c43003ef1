"""The ``edgepress`` command: run the service, and use it from a terminal or a CI step.

Service:   serve, worker, up, down, status (no job id: the local stack)
Models:    export (PyTorch -> ONNX, on your machine), upload
Jobs:      submit, wait, status JOB, list, cancel, download, report
Catalogue: devices

Every client command prints a human table, or JSON with ``--json`` (errors too, as the
RFC 9457 problem). Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import webbrowser
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from service.engine.headline import headline, lm_rows, threads_words
from service.engine.wording import describe_speedup

EXIT_CODES = """\
exit codes:
  0  success (for wait: the job succeeded and met its constraints)
  1  the job failed
  2  usage error (bad arguments)
  3  the job's constraints are not met (failure code constraints_unsatisfiable, or a recipe
     job whose result misses a constraint given with it)
  4  the job was cancelled
  5  the API refused the request (4xx problem: not found, validation, unsupported model ...)
  6  the API could not be reached or failed (connection error, 5xx)
  7  wait timed out (the job goes on)
  8  a local failure (file not found, export failed, checksum mismatch)
"""
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNMET = 0, 1, 2, 3
EXIT_CANCELLED, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_TIMEOUT, EXIT_LOCAL = 4, 5, 6, 7, 8

DEFAULT_API = "http://127.0.0.1:8080"


class CliError(Exception):
    """A failure the CLI reports with a message and an exit code (no traceback)."""

    def __init__(self, message: str, code: int = EXIT_LOCAL) -> None:
        super().__init__(message)
        self.exit_code = code


# ---------------------------------------------------------------------------------------------
# Output


class Output:
    """Human tables or JSON on stdout; progress and notes on stderr."""

    def __init__(self, as_json: bool, stream: Any = None, err: Any = None) -> None:
        self.as_json = as_json
        self.out = stream or sys.stdout
        self.err = err or sys.stderr

    def json(self, data: Any) -> None:
        self.out.write(json.dumps(data, indent=2, default=str) + "\n")

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def note(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        cells = [[_cell(v) for v in row] for row in rows]
        widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
        self.line("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))
                  .rstrip())
        for row in cells:
            self.line("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())

    def pairs(self, items: Sequence[tuple[str, Any]]) -> None:
        width = max((len(k) for k, v in items if v is not None), default=0)
        for key, value in items:
            if value is not None:
                self.line(f"{key.ljust(width)}  {_cell(value)}")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    return str(value)


def _mb(n: Any) -> str:
    return f"{n / 1e6:.3f} MB" if isinstance(n, (int, float)) else "-"


class ProgressView:
    """Job progress on stderr: a redrawn bar on a terminal, one line per change otherwise."""

    def __init__(self, stream: Any, tty: bool | None = None, width: int = 28) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.width = width
        self.last = ""
        self.started = time.monotonic()

    def __call__(self, job: Any) -> None:
        pct = max(0.0, min(1.0, float(job.progress)))
        state = job.state.value
        if self.tty:
            filled = int(round(pct * self.width))
            bar = "#" * filled + "-" * (self.width - filled)
            text = (f"\r[{bar}] {pct * 100:5.1f}%  {state:<9} {job.stage[:40]:<40} "
                    f"{time.monotonic() - self.started:6.1f}s")
            self.stream.write(text)
            if job.state.terminal:
                self.stream.write("\n")
        else:
            text = f"{job.id} {state} {job.stage} {pct * 100:.1f}%"
            if text == self.last:
                return
            self.last = text
            self.stream.write(text + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------
# Parsing helpers


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets and quotes (``op_types=[MatMul,Gemm]`` stays whole)."""
    parts: list[str] = []
    cur: list[str] = []
    depth, quote = 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p for p in (x.strip() for x in parts) if p]


def _value(raw: str) -> Any:
    """A recipe option value: JSON when it parses (numbers, booleans, lists), else a string;
    ``[a,b]`` without quotes is a list of strings."""
    try:
        return json.loads(raw)
    except ValueError:
        pass
    if raw.startswith("[") and raw.endswith("]"):
        return [_value(x) for x in _split_top(raw[1:-1])]
    return raw


def parse_pass(spec: str) -> dict[str, Any]:
    """``name[:k=v,k2=v2]`` -> ``{"pass": name, k: v, ...}`` (values parsed as JSON)."""
    name, _, opts = spec.partition(":")
    name = name.strip()
    if not name:
        raise CliError(f"--pass {spec!r}: a pass name is needed", EXIT_USAGE)
    step: dict[str, Any] = {"pass": name}
    for item in _split_top(opts):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise CliError(f"--pass {spec!r}: options are key=value, got {item!r}", EXIT_USAGE)
        step[key.strip()] = _value(raw.strip())
    return step


def parse_recipe_arg(text: str) -> list[dict[str, Any]] | str:
    """``--recipe``: JSON (a list of steps, or "auto"), or ``@file.json``."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise CliError(f"--recipe: cannot read {text[1:]}: {exc.strerror}") from None
    if text.strip() == "auto":
        return "auto"
    try:
        recipe = json.loads(text)
    except ValueError as exc:
        raise CliError(f"--recipe is not JSON: {exc}", EXIT_USAGE) from None
    if isinstance(recipe, dict) and "recipe" in recipe:
        recipe = recipe["recipe"]
    if recipe == "auto":
        return "auto"
    if not isinstance(recipe, list) or not all(isinstance(s, dict) for s in recipe):
        raise CliError('--recipe must be a JSON list of {"pass": ...} steps or "auto"',
                       EXIT_USAGE)
    return recipe


def parse_shape(spec: str) -> tuple[str, list[int]]:
    """``name=1x3x224x224`` -> ("name", [1, 3, 224, 224])."""
    name, eq, dims = spec.partition("=")
    try:
        shape = [int(d) for d in dims.lower().replace(",", "x").split("x") if d]
    except ValueError:
        shape = []
    if not eq or not name or not shape or any(d <= 0 for d in shape):
        raise CliError(f"--input-shape {spec!r}: expected name=1x3x224x224", EXIT_USAGE)
    return name.strip(), shape


def parse_value(spec: str) -> tuple[str, bool | int | float]:
    """``name=16000`` -> ("name", 16000); ``name=0.5``, ``name=true`` alike."""
    name, eq, raw = spec.partition("=")
    raw = raw.strip()
    value: bool | int | float
    try:
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        elif raw.lstrip("+-").isdigit():
            value = int(raw)
        else:
            value = float(raw)
    except ValueError:
        raise CliError(f"--input-value {spec!r}: expected name=16000", EXIT_USAGE) from None
    if not eq or not name.strip():
        raise CliError(f"--input-value {spec!r}: expected name=16000", EXIT_USAGE)
    return name.strip(), value


def parse_dynamic(spec: str) -> tuple[str, dict[int, str]]:
    """``name=0:batch,1:seq`` -> ("name", {0: "batch", 1: "seq"})."""
    name, eq, axes = spec.partition("=")
    out: dict[int, str] = {}
    for item in _split_top(axes):
        axis, colon, label = item.partition(":")
        try:
            out[int(axis)] = label.strip() if colon and label.strip() else f"{name}_dim{axis}"
        except ValueError:
            raise CliError(f"--dynamic {spec!r}: expected name=0:batch,1:seq",
                           EXIT_USAGE) from None
    if not eq or not name or not out:
        raise CliError(f"--dynamic {spec!r}: expected name=0:batch,1:seq", EXIT_USAGE)
    return name.strip(), out


def unmet_constraints(job: Any) -> list[str]:
    """Constraints of a finished recipe job that its result misses (auto jobs fail instead).

    Checked from the job's own result: size, host latency (a target latency cannot be checked
    without the auto search's estimate, and is skipped), fidelity, accuracy drop, and a
    decoder's KL divergence, perplexity increase and decode tokens/s.
    """
    c, r = job.constraints or {}, job.result or {}
    if not c or not r:
        return []
    misses = []
    stored = min(x for x in (r.get("bytes_after"), r.get("bytes_after_zstd")) if x is not None)
    if c.get("max_size_mb") is not None and stored / 1e6 > c["max_size_mb"]:
        misses.append(f"max_size_mb: {stored / 1e6:.4f} > {c['max_size_mb']}")
    lat = r.get("latency_ms_after")
    if (c.get("max_latency_ms") is not None and c.get("latency_on", "target") == "host"
            and lat is not None and lat > c["max_latency_ms"]):
        misses.append(f"max_latency_ms (host): {lat:.4f} > {c['max_latency_ms']}")
    fid = r.get("min_cosine")
    if c.get("min_fidelity") is not None and (fid is None or fid < c["min_fidelity"]):
        misses.append(f"min_fidelity: {fid} < {c['min_fidelity']}")
    before, after = r.get("accuracy_before"), r.get("accuracy_after")
    if c.get("max_accuracy_drop") is not None:
        if before is None or after is None:
            misses.append("max_accuracy_drop: accuracy was not measured (no labels)")
        elif before - after > c["max_accuracy_drop"]:
            misses.append(f"max_accuracy_drop: {before - after:.4f} > {c['max_accuracy_drop']}")
    lm = r.get("lm") or {}
    for key, value in (("max_kl_divergence", lm.get("kl_divergence")),
                       ("max_perplexity_increase", lm.get("perplexity_increase"))):
        if c.get(key) is None:
            continue
        if value is None:
            misses.append(f"{key}: not measured (not a decoder LLM)")
        elif value > c[key]:
            misses.append(f"{key}: {value:.5f} > {c[key]}")
    tokens, floor = lm.get("decode_tokens_per_s_after"), c.get("min_decode_tokens_per_s")
    if floor is not None:
        if tokens is None:
            misses.append("min_decode_tokens_per_s: not measured (not a decoder LLM)")
        elif tokens < floor:
            misses.append(f"min_decode_tokens_per_s: {tokens:.1f} < {floor}")
    return misses


def job_exit_code(job: Any) -> int:
    """The exit code ``wait`` returns for a finished job."""
    from service.jobs.record import JobState

    if job.state is JobState.succeeded:
        return EXIT_UNMET if unmet_constraints(job) else EXIT_OK
    if job.state is JobState.cancelled:
        return EXIT_CANCELLED
    if job.error is not None and job.error.code == "constraints_unsatisfiable":
        return EXIT_UNMET
    return EXIT_FAILED


# ---------------------------------------------------------------------------------------------
# Commands: service processes


def _exec(argv: list[str], env: dict[str, str]) -> int:
    """Replace this process (signals reach gunicorn/celery directly, as under a supervisor)."""
    os.execvpe(argv[0], argv, env)  # noqa: S606 - fixed argv built here
    return 0  # not reached


def cmd_serve(args: argparse.Namespace, out: Output) -> int:
    from service.devstack import _bin, _repo_file

    env = dict(os.environ)
    if args.bind:
        env["EDGEPRESS_BIND"] = args.bind
    if args.workers:
        env["EDGEPRESS_API_WORKERS"] = str(args.workers)
    # gunicorn's workers share metrics through this directory; it must start empty.
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="edgepress-api-metrics-"))
    conf = _repo_file("service/api/gunicorn_conf.py")
    return _exec([_bin("gunicorn"), "-c", str(conf), "service.api:create_app()"], env)


def cmd_worker(args: argparse.Namespace, out: Output) -> int:
    from service.config import Settings
    from service.devstack import _bin

    queue = args.queue or Settings().queue_name
    argv = [_bin("celery"), "-A", "service.worker.entry", "worker", f"--loglevel={args.loglevel}",
            f"--concurrency={args.concurrency}", "--prefetch-multiplier=1", "-Q", queue,
            "--without-gossip", "--without-mingle"]
    return _exec(argv, dict(os.environ))


def _stack(args: argparse.Namespace) -> Any:
    from service.devstack import LocalStack

    return LocalStack(Path(args.dir), api_port=args.api_port,
                      worker_metrics_port=args.worker_metrics_port,
                      worker_concurrency=args.concurrency)


def cmd_up(args: argparse.Namespace, out: Output) -> int:
    stack = _stack(args)
    status = stack.status()
    if status.get("running"):
        out.json(status) if out.as_json else out.line(
            f"stack already running: API {status.get('api_url')} (state in {stack.state_file})")
        return EXIT_OK
    try:
        state = stack.up()
    except RuntimeError as exc:
        raise CliError(f"the stack did not start: {exc}", EXIT_UNREACHABLE) from None
    if out.as_json:
        from dataclasses import asdict

        out.json({k: v for k, v in asdict(state).items() if k != "env"})
    else:
        out.pairs([("API", state.api_url), ("worker metrics", state.worker_metrics_url),
                   ("S3", f"{state.s3_endpoint} bucket={state.bucket}"),
                   ("broker", state.broker_url),
                   ("logs", f"{state.dir}/*.log   stop: edgepress down --dir {args.dir}")])
    return EXIT_OK


def cmd_down(args: argparse.Namespace, out: Output) -> int:
    stopped = _stack(args).down()
    if out.as_json:
        out.json({"stopped": stopped})
    else:
        out.line("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return EXIT_OK


def cmd_stack_status(args: argparse.Namespace, out: Output) -> int:
    status = _stack(args).status()
    status.pop("env", None)
    if out.as_json:
        out.json(status)
    elif not status.get("running") and not status.get("processes"):
        out.line(f"no local stack in {args.dir} (start one: edgepress up)")
    else:
        out.pairs([("running", status.get("running")), ("API", status.get("api_url")),
                   ("worker metrics", status.get("worker_metrics_url"))])
        out.table(["process", "pid", "alive"],
                  [[n, (status.get("pids") or {}).get(n), a]
                   for n, a in (status.get("processes") or {}).items()])
    return EXIT_OK if status.get("running") else EXIT_UNREACHABLE


# ---------------------------------------------------------------------------------------------
# Commands: export (user side, no server)


def _load_factory(spec: str) -> Any:
    import importlib

    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise CliError(f"--module {spec!r}: expected package.module:factory_or_class",
                       EXIT_USAGE)
    sys.path.insert(0, os.getcwd())  # the user's own modules, as `python -m` would find them
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise CliError(f"--module {spec!r}: {type(exc).__name__}: {exc}") from None
    import torch

    # A class or a factory is called with no arguments; a module instance is used as is.
    if not isinstance(target, torch.nn.Module) and not callable(target):
        raise CliError(f"--module {spec!r} is neither a module, a class nor a factory")
    module = target if isinstance(target, torch.nn.Module) else target()
    if not isinstance(module, torch.nn.Module):
        raise CliError(f"--module {spec!r} did not give a torch.nn.Module "
                       f"(got {type(module).__name__})")
    return module


def cmd_export(args: argparse.Namespace, out: Output) -> int:
    import numpy as np

    from service.engine.errors import EngineError
    from service.engine.export import export_pytorch

    if bool(args.input_shape) == bool(args.example_inputs):
        raise CliError("give either --input-shape (repeatable) or --example-inputs file.npz",
                       EXIT_USAGE)
    import torch

    module = _load_factory(args.module)
    names: list[str] = []
    tensors: list[Any] = []
    if args.input_shape:
        gen = torch.Generator().manual_seed(0)
        for spec in args.input_shape:
            name, shape = parse_shape(spec)
            names.append(name)
            tensors.append(torch.randn(*shape, generator=gen))
    else:
        try:
            # Never unpickle: object arrays in the .npz are refused by numpy itself.
            with np.load(args.example_inputs, allow_pickle=False) as data:
                for name in data.files:
                    names.append(name)
                    tensors.append(torch.from_numpy(np.ascontiguousarray(data[name])))
        except (OSError, ValueError) as exc:
            raise CliError(f"--example-inputs: {exc}") from None
    dynamic = dict(parse_dynamic(s) for s in args.dynamic or [])
    unknown = sorted(set(dynamic) - set(names) - set(args.output_name or []))
    if unknown:
        raise CliError(f"--dynamic names {unknown} are neither inputs {names} nor outputs",
                       EXIT_USAGE)
    output = Path(args.output)
    try:
        # The exporter prints its own progress on stdout; keep stdout for our result (--json).
        with contextlib.redirect_stdout(sys.stderr):
            path = export_pytorch(module, tuple(tensors), output, input_names=names,
                                  output_names=args.output_name or None,
                                  dynamic_axes=dynamic or None, opset=args.opset)
    except EngineError as exc:
        raise CliError(f"export failed ({exc.code}): {exc.message}") from None
    result: dict[str, Any] = {"path": str(path), "bytes": path.stat().st_size,
                              "inputs": {n: list(t.shape) for n, t in
                                         zip(names, tensors, strict=True)},
                              "opset": args.opset}
    if args.upload:
        record = _client(args).upload_model(path)
        result["model"] = record.model_dump(mode="json")
    if out.as_json:
        out.json(result)
    else:
        out.line(f"exported {path} ({_mb(result['bytes'])}, opset {args.opset}); "
                 "verified against PyTorch with ONNX Runtime")
        if args.upload:
            out.line(f"uploaded as {result['model']['id']}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Commands: client


def _client(args: argparse.Namespace) -> Any:
    from service.client import EdgePressClient

    return EdgePressClient(args.api, api_key=args.api_key, timeout=args.timeout,
                           max_retries=args.retries)


def _model_rows(models: Sequence[Any]) -> list[list[Any]]:
    return [[m.id, m.filename, _mb(m.bytes), m.parameter_count, m.opset,
             "yes" if m.already_quantized else "no", m.created_at.strftime("%Y-%m-%d %H:%M")]
            for m in models]


def _dataset_rows(datasets: Sequence[Any]) -> list[list[Any]]:
    return [[d.id, d.filename, _mb(d.bytes), d.samples, ", ".join(d.arrays),
             "yes" if d.has_labels else "no", d.created_at.strftime("%Y-%m-%d %H:%M")]
            for d in datasets]


def _print_model(out: Output, record: Any) -> None:
    if out.as_json:
        out.json(record.model_dump(mode="json"))
        return
    out.pairs([("id", record.id), ("file", record.filename), ("size", _mb(record.bytes)),
               ("sha256", record.sha256)])
    if hasattr(record, "parameter_count"):
        out.pairs([("format", record.format), ("opset", record.opset),
                   ("parameters", record.parameter_count),
                   ("inputs", [f"{i['name']}{i.get('shape')}" for i in record.inputs]),
                   ("outputs", [f"{o['name']}{o.get('shape')}" for o in record.outputs]),
                   ("quantized", ",".join(record.quantization) or "no")])
    else:
        out.pairs([("samples", record.samples), ("arrays", list(record.arrays)),
                   ("labels", record.has_labels)])


def _is_dataset(path: Path, kind: str) -> bool:
    return kind == "dataset" or (kind == "auto" and path.suffix.lower() == ".npz")


def cmd_upload(args: argparse.Namespace, out: Output) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    client = _client(args)
    record = (client.upload_dataset(path) if _is_dataset(path, args.kind)
              else client.upload_model(path))
    _print_model(out, record)
    return EXIT_OK


def _resolve_model(client: Any, ref: str, out: Output) -> str:
    if Path(ref).is_file():
        record = client.upload_model(Path(ref))
        out.note(f"uploaded {ref} as {record.id}")
        return str(record.id)
    if ref.startswith("mdl_"):
        return ref
    raise CliError(f"{ref!r} is neither a file nor a model id (mdl_...)")


def _resolve_dataset(client: Any, ref: str | None, out: Output) -> str | None:
    if ref is None:
        return None
    if Path(ref).is_file():
        record = client.upload_dataset(Path(ref))
        out.note(f"uploaded {ref} as {record.id}")
        return str(record.id)
    if ref.startswith("ds_"):
        return ref
    raise CliError(f"{ref!r} is neither a file nor a dataset id (ds_...)")


def _constraints(args: argparse.Namespace) -> dict[str, Any]:
    fields = {"max_size_mb": args.max_size_mb, "max_latency_ms": args.max_latency_ms,
              "max_accuracy_drop": args.max_accuracy_drop, "min_fidelity": args.min_fidelity,
              "max_memory_mb": args.max_memory_mb, "objective": args.objective,
              "latency_on": args.latency_on,
              "max_kl_divergence": args.max_kl_divergence,
              "max_perplexity_increase": args.max_perplexity_increase,
              "min_decode_tokens_per_s": args.min_decode_tokens_per_s}
    return {k: v for k, v in fields.items() if v is not None}


def cmd_submit(args: argparse.Namespace, out: Output) -> int:
    sources = [bool(args.recipe), bool(args.passes), bool(args.auto)]
    if sum(sources) != 1:
        raise CliError("give exactly one of --recipe, --pass (repeatable) or --auto", EXIT_USAGE)
    recipe: list[dict[str, Any]] | str
    if args.recipe:
        recipe = parse_recipe_arg(args.recipe)
    elif args.passes:
        recipe = [parse_pass(p) for p in args.passes]
    else:
        recipe = "auto"
    device: str | dict[str, Any] = args.device
    if args.device.startswith("@") or args.device.lstrip().startswith("{"):
        device = parse_json_arg(args.device, "--device")
    client = _client(args)
    model_id = _resolve_model(client, args.model, out)
    dataset_id = _resolve_dataset(client, args.dataset, out)
    job = client.submit_job(model_id, recipe, device=device, constraints=_constraints(args),
                            dataset_id=dataset_id, callback_url=args.callback_url,
                            input_shapes=dict(parse_shape(s) for s in args.input_shape or []),
                            input_values=dict(parse_value(v) for v in args.input_value or []))
    if args.wait:
        out.note(f"submitted {job.id}")
        return _wait_and_report(client, job.id, args, out)
    if out.as_json:
        out.json(job.public())
    else:
        out.line(job.id)
        out.note(f"follow it: edgepress wait {job.id}")
    return EXIT_OK


def parse_json_arg(text: str, flag: str) -> Any:
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise CliError(f"{flag}: cannot read {text[1:]}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CliError(f"{flag} is not JSON: {exc}", EXIT_USAGE) from None


def _print_job(out: Output, job: Any) -> None:
    if out.as_json:
        data = job.public()
        unmet = unmet_constraints(job)
        if unmet:
            data["unmet_constraints"] = unmet
        out.json(data)
        return
    r = job.result or {}
    out.pairs([("job", job.id), ("state", job.state.value), ("stage", job.stage),
               ("progress", f"{job.progress * 100:.1f}%"), ("model", job.model_id),
               ("device", job.device if isinstance(job.device, str) else job.device.get("name")),
               ("recipe", job.recipe if isinstance(job.recipe, str)
                else " -> ".join(str(s.get("pass")) for s in job.recipe)),
               ("constraints", job.constraints or None),
               ("created", job.created_at.isoformat(timespec="seconds")),
               ("finished", job.finished_at.isoformat(timespec="seconds")
                if job.finished_at else None)])
    if r:
        ratio = r.get("size_ratio")
        out.pairs([
            ("size", f"{_mb(r.get('bytes_before'))} -> {_mb(r.get('bytes_after'))}"
                     + (f" ({ratio:.2f}x smaller)" if ratio else "")),
            ("latency", f"{r.get('latency_ms_before', 0):.4f} -> "
                        f"{r.get('latency_ms_after', 0):.4f} ms on the worker"
                        + (f" ({describe_speedup(r['speedup'], r.get('placebo_band'))})"
                           if r.get("speedup") else "")),
            ("latency by threads", threads_words(r)),
            ("min cosine", r.get("min_cosine")),
            ("evaluated on", (f"{r['eval_inputs']} inputs"
                              + (f", {r['eval_samples']} samples" if r.get("eval_samples") else ""))
             if r.get("eval_inputs") else None),
            ("accuracy", f"{r['accuracy_before']:.4f} -> {r['accuracy_after']:.4f}"
             if r.get("accuracy_before") is not None and r.get("accuracy_after") is not None
             else None),
            *lm_rows(r.get("lm") or {}),
            ("chosen", (r.get("auto") or {}).get("candidate")),
            ("warnings", "; ".join(r.get("warnings") or []) or None),
            ("artifacts", job.artifacts or None)])
    if job.error is not None:
        out.pairs([("error", f"{job.error.code}: {job.error.message}")])
        missed = (job.error.details or {}).get("missed") or []
        for m in missed:
            out.line(f"  missed {m.get('constraint')}: {m.get('value')} vs limit "
                     f"{m.get('limit')}" + (f" (by {m['missed_by']})"
                                            if m.get("missed_by") is not None else ""))
    for miss in unmet_constraints(job):
        out.line(f"  unmet {miss}")


def _wait_and_report(client: Any, job_id: str, args: argparse.Namespace, out: Output) -> int:
    view = None if args.quiet else ProgressView(out.err)
    job = client.wait(job_id, poll=args.poll, timeout=args.timeout_wait, on_progress=view)
    _print_job(out, job)
    return job_exit_code(job)


def cmd_wait(args: argparse.Namespace, out: Output) -> int:
    return _wait_and_report(_client(args), args.job, args, out)


def cmd_status(args: argparse.Namespace, out: Output) -> int:
    if not args.job:
        return cmd_stack_status(args, out)
    job = _client(args).get_job(args.job)
    _print_job(out, job)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace, out: Output) -> int:
    job = _client(args).cancel_job(args.job)
    _print_job(out, job)
    return EXIT_OK


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    import itertools

    client = _client(args)
    uploads = (("models", client.list_models, _model_rows,
                ["id", "file", "size", "params", "opset", "quantized", "created"]),
               ("datasets", client.list_datasets, _dataset_rows,
                ["id", "file", "size", "samples", "inputs", "labels", "created"]))
    for flag, lister, rows_of, columns in uploads:
        if getattr(args, flag):
            records = list(itertools.islice(lister(), args.limit))
            if out.as_json:
                out.json([r.model_dump(mode="json") for r in records])
            else:
                out.table(columns, rows_of(records))
            return EXIT_OK
    jobs = list(itertools.islice(client.list_jobs(state=args.state), args.limit))
    if out.as_json:
        out.json([j.public() for j in jobs])
        return EXIT_OK
    rows = []
    for j in jobs:
        r = j.result or {}
        rows.append([j.id, j.state.value, j.stage,
                     f"{j.progress * 100:.0f}%",
                     j.device if isinstance(j.device, str) else j.device.get("name"),
                     j.recipe if isinstance(j.recipe, str)
                     else "+".join(str(s.get("pass")) for s in j.recipe),
                     f"{r['size_ratio']:.2f}x" if r.get("size_ratio") else
                     (j.error.code if j.error else "-"),
                     j.created_at.strftime("%Y-%m-%d %H:%M:%S")])
    out.table(["job", "state", "stage", "progress", "device", "recipe", "result", "created"],
              rows)
    return EXIT_OK


def cmd_download(args: argparse.Namespace, out: Output) -> int:
    client = _client(args)
    job = client.get_job(args.job)
    names = args.names or job.artifacts
    if not names:
        raise CliError(f"job {job.id} has no artifacts (state {job.state.value})",
                       EXIT_REFUSED)
    from service.client import safe_artifact_name

    names = [safe_artifact_name(n) for n in names]  # the server's names: all checked first
    target = Path(args.output)
    target.mkdir(parents=True, exist_ok=True)
    saved = []
    for name in names:
        path = client.download_artifact(job.id, name, target / name, job=job,
                                        check_onnx=args.check)
        saved.append({"name": name, "path": str(path), "bytes": path.stat().st_size})
        if not out.as_json:
            out.line(f"{path}  ({_mb(path.stat().st_size)})")
    if out.as_json:
        out.json(saved)
    return EXIT_OK


def summarize_report(report: dict[str, Any]) -> list[tuple[str, Any]]:
    """The headline of a ``report.json`` as (label, value) pairs: the numbers of its summary
    (``service.engine.headline``), the same that ``report.html`` and the job's result show."""
    h = headline(report)
    size = report.get("size") or {}
    auto = report.get("auto") or {}
    rows: list[tuple[str, Any]] = [
        ("mode", "auto" if auto else "recipe"),
        ("recipe", " -> ".join(str(p.get("pass")) for p in report.get("passes") or [])),
        ("device", (report.get("device") or {}).get("name")),
        ("size", f"{_mb(size.get('bytes_before'))} -> {_mb(size.get('bytes_after'))}"
                 + (f" ({size['ratio']:.2f}x smaller)" if size.get("ratio") else "")),
        ("latency (host)", f"{h.latency_ms_before or 0:.4f} -> {h.latency_ms_after or 0:.4f} ms"
                           + (f" ({h.speedup:.2f}x: {h.speed_words})" if h.speedup else "")),
        ("latency measured", h.latency_how if h.speedup else None),
        *[("latency by threads", line) for line in h.thread_lines()],
        ("min cosine", h.min_cosine),
        ("evaluated on", (f"{h.eval_inputs} inputs"
                          + (f", {h.eval_samples} samples" if h.eval_samples else ""))
         if h.eval_inputs else None),
    ]
    if h.accuracy_before is not None:
        rows.append(("accuracy", f"{h.accuracy_before:.4f} -> {h.accuracy_after}"))
    rows.extend(lm_rows(h.lm))
    chosen = auto.get("chosen") or {}
    if chosen:
        rows.append(("chosen", chosen.get("candidate")))
        rows.append(("why", chosen.get("why")))
        est = chosen.get("target_estimate") or {}
        # An estimate only where the target was not measured (never beside a measurement).
        if est and h.target_measured is False:
            rows.append((f"estimate on {est.get('device')}",
                         f"{est.get('latency_ms')} ms, {est.get('peak_memory_mb')} MB peak, "
                         f"{est.get('energy_mj')} mJ (cost model)"))
        front = (auto.get("pareto_front") or {}).get("front")
        if front:
            rows.append(("pareto front", ", ".join(front)))
    for name, f in h.fidelity.items():
        rows.append((f"output {name}", f"cosine {f.get('cosine')}, SQNR {f.get('sqnr_db')} dB"))
    for w in report.get("warnings") or []:
        rows.append(("warning", w))
    return rows


def cmd_report(args: argparse.Namespace, out: Output) -> int:
    ref = args.ref
    local = Path(ref)
    if args.open:
        if local.is_file():
            html_path = local if local.suffix == ".html" else local.with_name("report.html")
            if not html_path.is_file():
                raise CliError(f"{html_path}: no such file")
        else:
            html_path = Path(tempfile.mkdtemp(prefix="edgepress-")) / f"{ref}-report.html"
            _client(args).download_artifact(ref, "report.html", html_path)
        opened = webbrowser.open(html_path.resolve().as_uri())
        if out.as_json:
            out.json({"path": str(html_path), "opened": opened})
        else:
            out.line(str(html_path) + ("" if opened else "  (no browser found: open it)"))
        return EXIT_OK
    if local.is_file():
        try:
            report = json.loads(local.read_text())
        except ValueError as exc:
            raise CliError(f"{local}: not JSON ({exc})") from None
    else:
        with tempfile.TemporaryDirectory(prefix="edgepress-") as tmp:
            path = _client(args).download_artifact(ref, "report.json", Path(tmp) / "r.json")
            report = json.loads(path.read_text())
    if out.as_json:
        out.json(report)
    else:
        out.pairs(summarize_report(report))
    return EXIT_OK


def cmd_devices(args: argparse.Namespace, out: Output) -> int:
    client = _client(args)
    if args.name:
        device = client.get_device(args.name)
        if out.as_json:
            out.json(device.model_dump(mode="json"))
        else:
            out.pairs(list(device.model_dump(mode="json").items()))
        return EXIT_OK
    devices = client.list_devices()
    if out.as_json:
        out.json([d.model_dump(mode="json") for d in devices])
        return EXIT_OK
    out.table(["name", "kind", "arch", "precisions", "memory", "title"],
              [[d.name, d.kind, d.architecture, list(d.precisions),
                f"{d.memory_mb / 1024:.0f} GB" if d.memory_mb else "-", d.title[:48]]
               for d in devices])
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and for generated docs)."""
    # Options shared by every client command; accepted before or after the command name.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api", default=argparse.SUPPRESS,
                        help=f"API base URL (env EDGEPRESS_API_URL, default {DEFAULT_API})")
    common.add_argument("--api-key", default=argparse.SUPPRESS,
                        help="sent as a Bearer token (env EDGEPRESS_API_KEY)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable JSON on stdout")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                        help="seconds per HTTP request (default 30)")
    common.add_argument("--retries", type=int, default=argparse.SUPPRESS,
                        help="retries on 429/503/connection errors (default 5)")

    parser = argparse.ArgumentParser(
        prog="edgepress", parents=[common],
        description="EdgePress: model compression as a service. Run the service, export "
                    "PyTorch models to ONNX, submit compression jobs and fetch their results.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace, Output], int], help_text: str,
            client: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           parents=[common] if client else [], epilog=EXIT_CODES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    def stack_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", default=".stack", help="state, logs and data (default .stack)")
        p.add_argument("--api-port", type=int, default=8080)
        p.add_argument("--worker-metrics-port", type=int, default=9808)
        p.add_argument("--concurrency", type=int, default=1, help="worker processes")

    p = add("serve", cmd_serve, "run the API under gunicorn (service/api/gunicorn_conf.py)")
    p.add_argument("--bind", help="host:port (default EDGEPRESS_BIND or 127.0.0.1:8080)")
    p.add_argument("--workers", type=int, help="gunicorn worker processes")
    p = add("worker", cmd_worker, "run a Celery worker that compresses jobs")
    p.add_argument("--concurrency", type=int, default=1, help="jobs at once (default 1)")
    p.add_argument("--queue", help="queue name (default EDGEPRESS_QUEUE_NAME)")
    p.add_argument("--loglevel", default="INFO")
    p = add("up", cmd_up, "start the local stack (SeaweedFS, Redis, API, worker)")
    stack_opts(p)
    p = add("down", cmd_down, "stop the local stack started by up")
    stack_opts(p)

    p = add("export", cmd_export, "export a PyTorch module to ONNX on this machine "
            "(verified with ONNX Runtime); optionally upload it")
    p.add_argument("--module", required=True,
                   help="package.module:factory_or_class returning a torch.nn.Module")
    p.add_argument("--input-shape", action="append", metavar="NAME=1x3x224x224",
                   help="an input's name and example shape (repeatable; random values)")
    p.add_argument("--example-inputs", metavar="FILE.npz",
                   help="example inputs keyed by input name (read without pickle)")
    p.add_argument("--output-name", action="append", help="output names (repeatable)")
    p.add_argument("--dynamic", action="append", metavar="NAME=0:batch,1:seq",
                   help="dynamic axes of an input or output (repeatable)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--output", "-o", default="model.onnx")
    p.add_argument("--upload", action="store_true", help="upload the exported model")

    p = add("upload", cmd_upload, "upload a model (.onnx, .zip, .tar) or a dataset (.npz)")
    p.add_argument("file")
    p.add_argument("--kind", choices=["auto", "model", "dataset"], default="auto",
                   help="default: .npz is a dataset, anything else a model")

    p = add("submit", cmd_submit, "start a compression job")
    p.add_argument("model", help="a model file (uploaded first) or a model id (mdl_...)")
    p.add_argument("--device", default="host",
                   help="device name (see devices), or an inline JSON profile / @file.json")
    p.add_argument("--recipe", help='JSON list of {"pass": ...} steps, "auto", or @file.json')
    p.add_argument("--pass", dest="passes", action="append", metavar="NAME[:K=V,...]",
                   help="a recipe step (repeatable, in order), e.g. "
                        "quantize_static:per_channel=true,calibration=entropy")
    p.add_argument("--auto", action="store_true", help="search for the best recipe")
    p.add_argument("--dataset", help="a dataset file (.npz, uploaded first) or id (ds_...)")
    p.add_argument("--input-shape", action="append", metavar="NAME=1x3x640x640",
                   help="the shape of a model input for generated inputs (repeatable; without "
                        "it and without a dataset, dynamic dims are probed)")
    p.add_argument("--input-value", action="append", metavar="NAME=16000",
                   help="fill a model input with this value, e.g. a sample rate (repeatable)")
    p.add_argument("--max-size-mb", type=float)
    p.add_argument("--max-latency-ms", type=float)
    p.add_argument("--latency-on", choices=["target", "host"])
    p.add_argument("--max-accuracy-drop", type=float, help="fraction, e.g. 0.01")
    p.add_argument("--min-fidelity", type=float, help="min cosine similarity, e.g. 0.99")
    p.add_argument("--max-memory-mb", type=float)
    p.add_argument("--max-kl-divergence", type=float,
                   help="decoder LLMs: next-token KL divergence in nats, e.g. 0.01")
    p.add_argument("--max-perplexity-increase", type=float,
                   help="decoder LLMs: relative perplexity increase, e.g. 0.05")
    p.add_argument("--min-decode-tokens-per-s", type=float,
                   help="decoder LLMs: decode tokens/s measured on the worker")
    p.add_argument("--objective", choices=["size", "latency", "balanced"])
    p.add_argument("--callback-url")
    p.add_argument("--wait", action="store_true", help="wait for the job (exit code as wait)")
    wait_opts = [p]

    p = add("wait", cmd_wait, "wait for a job; exit 0 on success, non-zero otherwise")
    p.add_argument("job")
    wait_opts.append(p)
    for p in wait_opts:
        p.add_argument("--poll", type=float, default=1.0, help="seconds between polls")
        p.add_argument("--timeout-wait", "--for", type=float, default=None,
                       dest="timeout_wait", metavar="SECONDS",
                       help="give up waiting after this long (exit 7)")
        p.add_argument("--quiet", "-q", action="store_true", help="no progress output")

    p = add("status", cmd_status, "a job's state and result; without a job id, the local "
            "stack's processes")
    p.add_argument("job", nargs="?")
    stack_opts(p)
    p = add("cancel", cmd_cancel, "cancel a job")
    p.add_argument("job")
    p = add("list", cmd_list, "list jobs (newest first), models or datasets")
    p.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--models", action="store_true", help="list models instead of jobs")
    what.add_argument("--datasets", action="store_true", help="list datasets instead of jobs")
    p.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    p = add("download", cmd_download, "download a job's artifacts (all by default), verified")
    p.add_argument("job")
    p.add_argument("names", nargs="*", help="artifact names (model.onnx, report.json ...)")
    p.add_argument("--output", "-o", default=".", help="directory (default .)")
    p.add_argument("--check", action="store_true", help="also run the ONNX checker")
    p = add("report", cmd_report, "print a job's report summary, or open report.html")
    p.add_argument("ref", help="a job id, or a local report.json / report.html")
    p.add_argument("--open", action="store_true", help="open report.html in a browser")
    p = add("devices", cmd_devices, "the device catalogue, or one device's profile")
    p.add_argument("name", nargs="?")
    return parser


def _finish_args(args: argparse.Namespace) -> argparse.Namespace:
    # The CLI is a client of the API: reading its own environment variables here is fine (the
    # service's settings stay in service.config).
    defaults = {
        "api": os.environ.get("EDGEPRESS_API_URL") or DEFAULT_API,
        "api_key": os.environ.get("EDGEPRESS_API_KEY") or None,
        "json": False,
        "timeout": 30.0,
        "retries": 5,
    }
    for key, value in defaults.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``edgepress``; returns the exit code (see ``EXIT_CODES``)."""
    parser = build_parser()
    args = _finish_args(parser.parse_args(argv))
    out = Output(args.json)
    from service.client import EdgePressError

    try:
        return int(args.func(args, out))
    except CliError as exc:
        _report_error(out, {"code": "cli_error", "detail": str(exc)}, str(exc))
        return exc.exit_code
    except EdgePressError as exc:
        _report_error(out, exc.to_dict(), str(exc))
        for e in exc.errors:
            out.note(f"  {e.get('field')}: {e.get('message')}")
        if exc.code == "wait_timeout":
            return EXIT_TIMEOUT
        if exc.code == "checksum_mismatch":
            return EXIT_LOCAL
        if exc.status is None and exc.code == "validation_error":
            return EXIT_USAGE
        if exc.status is None or exc.status >= 500:
            return EXIT_UNREACHABLE
        return EXIT_REFUSED
    except KeyboardInterrupt:
        out.note("interrupted")
        return 130


def _report_error(out: Output, problem: dict[str, Any], text: str) -> None:
    if out.as_json:
        out.json({"error": problem})
    out.note(f"edgepress: error: {text}")


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main", "build_parser", "parse_pass", "parse_recipe_arg", "parse_shape",
           "parse_dynamic", "parse_value", "unmet_constraints", "job_exit_code", "summarize_report",
           "EXIT_CODES"]
