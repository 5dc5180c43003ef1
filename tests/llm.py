"""Test material for the decoder family: a small byte-level causal LM trained here, no hub.

``byte_llama(cache_dir)`` builds a Llama-architecture decoder from a ``transformers`` config
(vocabulary = the 256 byte values, so no tokenizer is downloaded), trains it for a bounded
number of steps on the Python standard library's sources (files of
``sysconfig.get_paths()["stdlib"]``; train and held-out text split by file) and exports it to
ONNX with its KV cache:

- inputs ``input_ids`` [batch, sequence] int64, ``attention_mask`` [batch, past + sequence]
  int64, ``position_ids`` [batch, sequence] int64, ``past_key_values.{i}.key`` /
  ``past_key_values.{i}.value`` [batch, kv_heads, past, head_dim] float32;
- outputs ``logits`` [batch, sequence, 256] and ``present.{i}.key`` / ``present.{i}.value``
  [batch, kv_heads, past + sequence, head_dim].

It returns an ``LLM`` with the model's path, held-out token sequences (``heldout``, [N, L]
int64, from files the model never trained on) and ``info`` (config dims, steps, seconds,
exporter, the float model's held-out loss). A second call with the same directory reuses the
files (the tests' cache, like ``tests.corpus``). torch and transformers are imported inside.

Two sizes (``SIZES``), each cached under its own name:

- ``"small"`` (the default, the tests' model, ``byte_llama.onnx``): 3 layers, hidden 128,
  intermediate 384, 4 attention / 2 KV heads; 160 steps of batch 16; 2.76 MB float32.
- ``"wide"`` (``byte_llama_wide.onnx``, for ``scripts/bench_llm.py --model wide``; the
  issue's example LM was 39 MB): 4 layers, hidden 512, intermediate 1024, 8 attention / 4 KV
  heads; 300 steps of batch 16; 9.70 M parameters, 38.8 MB float32 (a 39.0 MB file). Not
  built by the suite.
"""

from __future__ import annotations

import json
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

SEED = 0
NAME = "byte_llama"
CONFIG = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 384,
          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 512, "tie_word_embeddings": False,
          "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
TRAIN_STEPS = 160
TRAIN_SECONDS = 300.0  # a stall guard only: steps bound the training (same model anywhere)
SEQ = 128
BATCH = 16
HELDOUT_SEQUENCES = 64
LEARNING_RATE = 3e-3


class Size(NamedTuple):
    """One trained configuration: its cache name, ``LlamaConfig`` fields and training."""
    name: str
    config: dict[str, Any]
    steps: int
    batch: int
    learning_rate: float
    stall_seconds: float  # a guard only: steps bound the training


SIZES: dict[str, Size] = {
    "small": Size(NAME, CONFIG, TRAIN_STEPS, BATCH, LEARNING_RATE, TRAIN_SECONDS),
    # ~0.9 s a step alone on 2 cores of an AMD EPYC (torch, batch 16 x 128 tokens); 300 steps
    # took 600 s with the host shared: loss 5.71 -> 1.83, held-out 1.79 (ln 256 = 5.55).
    "wide": Size(f"{NAME}_wide",
                 {**CONFIG, "hidden_size": 512, "intermediate_size": 1024,
                  "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4},
                 300, 16, 2e-3, 1200.0),
}


class LLM(NamedTuple):
    path: Path
    heldout: np.ndarray  # [N, L] int64 token ids (bytes) from held-out files

    @property
    def info(self) -> dict[str, Any]:
        return json.loads(self.path.with_suffix(".json").read_text())


def stdlib_bytes(max_files: int = 400) -> tuple[bytes, bytes]:
    """(train, held-out) text: the standard library's ``.py`` files, sorted, every fifth file
    held out, each side capped to keep reading cheap."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())[:max_files]
    train, held = bytearray(), bytearray()
    for i, p in enumerate(files):
        data = p.read_bytes()
        (held if i % 5 == 4 else train).extend(data)
    return bytes(train[:8_000_000]), bytes(held[:2_000_000])


def _sequences(data: bytes, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    arr = np.frombuffer(data, dtype=np.uint8)
    starts = rng.integers(0, len(arr) - length - 1, size=n)
    return np.stack([arr[s:s + length] for s in starts]).astype(np.int64)


class _WithCache:
    """Builds the flat-tensor wrapper the exporter traces (transformers' cache classes are not
    tensors): past key/value tensors in, logits and present tensors out."""

    @staticmethod
    def make(model: Any, layers: int) -> Any:
        import torch
        from transformers import DynamicCache

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, position_ids, *past):  # type: ignore[no-untyped-def]
                cache = DynamicCache()
                for i in range(layers):
                    cache.update(past[2 * i], past[2 * i + 1], i)
                out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=cache,
                                 use_cache=True)
                present = []
                for layer in out.past_key_values.layers:
                    present += [layer.keys, layer.values]
                return (out.logits, *present)

        return Wrapper().eval()


def _cache_export(model: Any, config: Any, ids: Any) -> tuple[Any, tuple, list[str], list[str],
                                                               dict]:
    """(wrapper, example inputs, input names, output names, dynamic axes) to export ``model``
    with its KV cache: ``input_ids``, ``attention_mask`` [batch, total_sequence],
    ``position_ids``, ``past_key_values.{i}.key/value`` in; ``logits``, ``present.{i}.*`` out.
    ``ids``: [1, S] example token ids."""
    import torch

    layers = config.num_hidden_layers
    head_dim = config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads
    wrapper = _WithCache.make(model, layers)
    past_len, seq = 3, int(ids.shape[1])
    past = []
    for _ in range(layers):
        past += [torch.randn(1, kv, past_len, head_dim), torch.randn(1, kv, past_len, head_dim)]
    example = (ids, torch.ones(1, past_len + seq, dtype=torch.int64),
               torch.arange(past_len, past_len + seq).unsqueeze(0), *past)
    past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present_names = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    dynamic = {"input_ids": {0: "batch", 1: "sequence"},
               "attention_mask": {0: "batch", 1: "total_sequence"},
               "position_ids": {0: "batch", 1: "sequence"},
               **{n: {0: "batch", 2: "past_sequence"} for n in past_names},
               "logits": {0: "batch", 1: "sequence"},
               **{n: {0: "batch", 2: "total_sequence"} for n in present_names}}
    return (wrapper, example, ["input_ids", "attention_mask", "position_ids", *past_names],
            ["logits", *present_names], dynamic)


def byte_llama(cache_dir: Path, size: str = "small") -> LLM:
    """The trained byte-level Llama decoder with its KV cache, of one of ``SIZES`` (module
    docstring)."""
    cache_dir = Path(cache_dir)
    chosen = SIZES[size]
    name = chosen.name
    path = cache_dir / f"{name}.onnx"
    held_path = path.with_suffix(".npz")
    if path.exists() and held_path.exists() and path.with_suffix(".json").exists():
        with np.load(held_path, allow_pickle=False) as data:
            return LLM(path, data["heldout"])
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    train_text, held_text = stdlib_bytes()
    config = LlamaConfig(**chosen.config, attn_implementation="eager")
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=chosen.learning_rate,
                            weight_decay=0.01)
    warm = max(1, chosen.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to 10 %
        opt, lambda k: min((k + 1) / warm, 1.0 - 0.9 * k / chosen.steps))
    started = time.perf_counter()
    steps = 0
    losses: list[float] = []
    model.train()
    while steps < chosen.steps and time.perf_counter() - started < chosen.stall_seconds:
        batch = torch.from_numpy(_sequences(train_text, chosen.batch, SEQ + 1, rng))
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        steps += 1
    seconds = time.perf_counter() - started
    model.eval()
    heldout = _sequences(held_text, HELDOUT_SEQUENCES, SEQ, np.random.default_rng(SEED + 1))
    with torch.no_grad():
        held_loss = float(model(input_ids=torch.from_numpy(heldout[:16]),
                                labels=torch.from_numpy(heldout[:16])).loss)

    wrapper, example, input_names, output_names, dynamic = _cache_export(
        model, config, torch.from_numpy(heldout[:1, :5]))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{name}.tmp.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The legacy (TorchScript) exporter: it traces the cache wrapper with a past length
        # that may be 0 at run time (the dynamo exporter specialises 0/1-sized dims).
        torch.onnx.export(wrapper, example, str(tmp), dynamo=False, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic, opset_version=18)
    import onnx

    proto = onnx.load(str(tmp), load_external_data=True)
    onnx.save_model(proto, str(path), save_as_external_data=False)
    for stray in cache_dir.glob(f".{name}.tmp.onnx*"):
        stray.unlink()
    np.savez(held_path, heldout=heldout)
    info = {"size": size, "config": chosen.config, "steps": steps,
            "train_seconds": round(seconds, 1), "sequence": SEQ, "batch": chosen.batch,
            "learning_rate": chosen.learning_rate,
            # training-batch loss of the untrained model (step 1) and mean of the last 10 steps
            "first_train_loss": losses[0], "last_train_loss": float(np.mean(losses[-10:])),
            "heldout_loss": held_loss,
            "heldout_perplexity": float(np.exp(held_loss)), "exporter": "torchscript",
            "train_bytes": len(train_text), "heldout_bytes": len(held_text),
            "input_names": input_names, "output_names": output_names}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return LLM(path, heldout)


def random_llama(directory: Path, config: dict[str, Any], name: str = "model.onnx",
                 seed: int = SEED, kv_cache: bool = False) -> Path:
    """A Llama-architecture decoder with random weights from ``config`` (``transformers``
    ``LlamaConfig`` fields), exported without a KV cache (``input_ids`` [batch, sequence],
    ``attention_mask`` → ``logits``), or with it (``kv_cache``: the inputs and outputs of
    ``byte_llama``'s export), and saved as ``directory/name`` with every weight in
    ``name + ".data"`` (external data, one file). Built in torch, exported by the legacy
    exporter (which writes external data itself past 2 GiB), then gathered into one data file
    by onnx without loading the weights twice over: the big-model path's test material."""
    import shutil
    import tempfile

    import onnx
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="eager"))

        def forward(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=False).logits

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids = torch.zeros(1, 8, dtype=torch.int64)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        raw = Path(tmp) / "export.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if kv_cache:
                decoder = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="eager"))
                wrapper, example, input_names, output_names, dynamic = _cache_export(
                    decoder.eval(), decoder.config, ids)
                del decoder
            else:
                wrapper = Logits().eval()
                example = (ids, torch.ones_like(ids))
                input_names, output_names = ["input_ids", "attention_mask"], ["logits"]
                dynamic = {"input_ids": {0: "batch", 1: "sequence"},
                           "attention_mask": {0: "batch", 1: "sequence"},
                           "logits": {0: "batch", 1: "sequence"}}
            torch.onnx.export(wrapper, example, str(raw), dynamo=False,
                              input_names=input_names, output_names=output_names,
                              opset_version=18, dynamic_axes=dynamic)
        del wrapper  # the float weights once, not twice, while onnx gathers them
        proto = onnx.load(str(raw), load_external_data=True)
        shutil.rmtree(tmp, ignore_errors=True)
        path = directory / name
        onnx.save_model(proto, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=name + ".data",
                        size_threshold=1024)
    return path
