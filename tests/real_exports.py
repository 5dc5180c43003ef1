"""Models shaped like real exports that nobody here wrote, built with onnx.helper.

Each carries one trait that broke generated evaluation inputs or datasets: a detector whose
strides need sides that are multiples of 64, an audio model whose reflect padding needs long
signals (with a scalar int64 sample rate switching an ``If`` and a recurrent state whose batch
axis is axis 1), a token encoder whose position table bounds the sequence length, a CNN with a
fixed batch of 1, and a PaddlePaddle-style graph (``-1`` dims, weights in ``Constant`` nodes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def _w(rng: np.random.Generator, *shape: int, scale: float = 0.2) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _model(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    m = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], producer_name="tests")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def stride_detector(dynamic: str = "named") -> onnx.ModelProto:
    """x[N, 3, H, W] -> six stride-2 convs (stride 64) -> upsampled deep features concatenated
    with shallower ones twice (a feature pyramid) -> y[N, 4, H/16, W/16].

    Runs only where H and W are multiples of 64 (e.g. 320); 224 and 16 fail in ``Concat``.
    ``dynamic`` = "named" (symbols) or "paddle" (``-1`` dims).
    """
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    chans = [3, 8, 8, 8, 16, 16, 16]
    prev = "x"
    for i in range(6):
        inits += [nh.from_array(_w(rng, chans[i + 1], chans[i], 3, 3), f"w{i}"),
                  nh.from_array(_w(rng, chans[i + 1]), f"b{i}")]
        nodes += [h.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}",
                              strides=[2, 2], pads=[1, 1, 1, 1]),
                  h.make_node("Relu", [f"c{i}"], [f"f{i}"], name=f"relu{i}")]
        prev = f"f{i}"
    inits.append(nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    # f5 is H/64, f4 H/32, f3 H/16
    inits += [nh.from_array(_w(rng, 16, 32, 1, 1), "wm"), nh.from_array(_w(rng, 16), "bm"),
              nh.from_array(_w(rng, 4, 32, 3, 3), "wh"), nh.from_array(_w(rng, 4), "bh")]
    nodes += [
        h.make_node("Resize", ["f5", "", "scales"], ["u5"], name="up5", mode="nearest"),
        h.make_node("Concat", ["u5", "f4"], ["p4"], name="cat4", axis=1),
        h.make_node("Conv", ["p4", "wm", "bm"], ["m4"], name="merge4"),
        h.make_node("Resize", ["m4", "", "scales"], ["u4"], name="up4", mode="nearest"),
        h.make_node("Concat", ["u4", "f3"], ["p3"], name="cat3", axis=1),
        h.make_node("Conv", ["p3", "wh", "bh"], ["y"], name="head", pads=[1, 1, 1, 1]),
    ]
    if dynamic == "paddle":
        x_dims: list = [-1, 3, -1, -1]
        y_dims: list = [-1, 4, -1, -1]
    else:
        x_dims, y_dims = ["batch", 3, "height", "width"], ["batch", 4, "h16", "w16"]
    g = h.make_graph(nodes, "stride_detector",
                     [h.make_tensor_value_info("x", T.FLOAT, x_dims)],
                     [h.make_tensor_value_info("y", T.FLOAT, y_dims)], initializer=inits)
    return _model(g)


def reflect_audio(hidden: int = 64, channels: int = 64) -> onnx.ModelProto:
    """wave[N, T] -> reflect Pad 64 -> Conv1d(k=128, stride 64) (an STFT-like front end) ->
    GRU with a recurrent state ``state[1, N, hidden]`` (batch on axis 1) -> an ``If`` on the
    scalar int64 ``sr`` == 16000 (the other branch cannot reshape) -> logits[N, hidden],
    new_state[1, N, hidden].

    Needs T well above 64 (reflect padding) and sr = 16000.
    """
    rng = np.random.default_rng(1)
    inits = [
        nh.from_array(np.array([0, 0, 64, 0, 0, 64], np.int64), "pads"),
        nh.from_array(_w(rng, channels, 1, 128, scale=0.05), "wconv"),
        nh.from_array(_w(rng, 1, 3 * hidden, channels), "W"),
        nh.from_array(_w(rng, 1, 3 * hidden, hidden), "R"),
        nh.from_array(_w(rng, 1, 6 * hidden), "B"),
        nh.from_array(np.array(16000, np.int64), "rate"),
        nh.from_array(np.array([1], np.int64), "ax1"),
        nh.from_array(np.array([0], np.int64), "ax0"),
        nh.from_array(np.array([7, -1], np.int64), "bad_shape"),
    ]
    then_g = h.make_graph([h.make_node("Identity", ["hsq"], ["out_then"])], "then", [],
                          [h.make_tensor_value_info("out_then", T.FLOAT, ["b", hidden])])
    else_g = h.make_graph([h.make_node("Reshape", ["hsq", "bad_shape"], ["out_else"])], "else",
                          [], [h.make_tensor_value_info("out_else", T.FLOAT, ["r", "c"])])
    nodes = [
        h.make_node("Unsqueeze", ["wave", "ax1"], ["w3"], name="to_channels"),
        h.make_node("Pad", ["w3", "pads"], ["padded"], name="reflect", mode="reflect"),
        h.make_node("Conv", ["padded", "wconv"], ["spec"], name="stft", strides=[64]),
        h.make_node("Abs", ["spec"], ["mag"], name="magnitude"),
        h.make_node("Transpose", ["mag"], ["seq"], name="to_time_major", perm=[2, 0, 1]),
        h.make_node("GRU", ["seq", "W", "R", "B", "", "state"], ["Y", "new_state"],
                    name="gru", hidden_size=hidden),
        h.make_node("Squeeze", ["new_state", "ax0"], ["hsq"], name="last"),
        h.make_node("Equal", ["sr", "rate"], ["is16k"], name="check_rate"),
        h.make_node("If", ["is16k"], ["logits"], name="by_rate", then_branch=then_g,
                    else_branch=else_g),
    ]
    g = h.make_graph(
        nodes, "reflect_audio",
        [h.make_tensor_value_info("wave", T.FLOAT, ["batch", "time"]),
         h.make_tensor_value_info("sr", T.INT64, []),
         h.make_tensor_value_info("state", T.FLOAT, [1, "batch", hidden])],
        [h.make_tensor_value_info("logits", T.FLOAT, ["batch", hidden]),
         h.make_tensor_value_info("new_state", T.FLOAT, [1, "batch", hidden])],
        initializer=inits)
    return _model(g)


def token_encoder(vocab: int = 1000, positions: int = 64, width: int = 32) -> onnx.ModelProto:
    """ids[-1, -1] int64 and attention_mask[-1, -1] -> token + position embeddings (the
    position table has ``positions`` rows, so longer sequences fail) -> masked mean ->
    MatMul -> emb[-1, 8]."""
    rng = np.random.default_rng(2)
    inits = [nh.from_array(_w(rng, vocab, width), "tok"),
             nh.from_array(_w(rng, positions, width), "pos"),
             nh.from_array(_w(rng, width, 8), "proj"),
             nh.from_array(np.array(1, np.int64), "one"),
             nh.from_array(np.array(0, np.int64), "zero"),
             nh.from_array(np.array([2], np.int64), "ax2"),
             nh.from_array(np.array([1], np.int64), "ax1")]
    nodes = [
        h.make_node("Gather", ["tok", "ids"], ["te"], name="tokens", axis=0),
        h.make_node("Shape", ["ids"], ["shp"], name="shape"),
        h.make_node("Gather", ["shp", "one"], ["length"], name="length", axis=0),
        h.make_node("Range", ["zero", "length", "one"], ["positions"], name="range"),
        h.make_node("Gather", ["pos", "positions"], ["pe"], name="position_table", axis=0),
        h.make_node("Add", ["te", "pe"], ["e"], name="embed"),
        h.make_node("Cast", ["attention_mask"], ["mf"], name="mask_float", to=T.FLOAT),
        h.make_node("Unsqueeze", ["mf", "ax2"], ["m3"], name="mask3"),
        h.make_node("Mul", ["e", "m3"], ["masked"], name="apply_mask"),
        h.make_node("ReduceSum", ["masked", "ax1"], ["summed"], name="pool", keepdims=0),
        h.make_node("MatMul", ["summed", "proj"], ["emb"], name="project"),
    ]
    g = h.make_graph(nodes, "token_encoder",
                     [h.make_tensor_value_info("ids", T.INT64, [-1, -1]),
                      h.make_tensor_value_info("attention_mask", T.INT64, [-1, -1])],
                     [h.make_tensor_value_info("emb", T.FLOAT, [-1, 8])], initializer=inits)
    return _model(g)


def fixed_batch_cnn(classes: int = 10) -> onnx.ModelProto:
    """x[1, 3, 32, 32] (batch fixed at 1) -> Conv/Relu x3 -> GlobalAveragePool -> Gemm."""
    rng = np.random.default_rng(3)
    inits = [nh.from_array(_w(rng, 32, 3, 3, 3), "w1"), nh.from_array(_w(rng, 32), "b1"),
             nh.from_array(_w(rng, 64, 32, 3, 3, scale=0.05), "w2"),
             nh.from_array(_w(rng, 64), "b2"),
             nh.from_array(_w(rng, 64, 64, 3, 3, scale=0.05), "w3"),
             nh.from_array(_w(rng, 64), "b3"),
             nh.from_array(_w(rng, classes, 64), "wf"), nh.from_array(_w(rng, classes), "bf")]
    nodes = [
        h.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        h.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1],
                    strides=[2, 2]),
        h.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        h.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        h.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        h.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        h.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    g = h.make_graph(nodes, "fixed_batch_cnn",
                     [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 32, 32])],
                     [h.make_tensor_value_info("logits", T.FLOAT, [1, classes])],
                     initializer=inits)
    return _model(g)


def paddle_classifier(classes: int = 8, channels: int = 16) -> onnx.ModelProto:
    """A PaddlePaddle-style export: ``-1`` dims on inputs, outputs and value_info, weights in
    ``Constant`` nodes, a Reshape to ``[-1, C]``: x[-1, 3, -1, -1] -> probs[-1, C]."""
    rng = np.random.default_rng(4)

    def const(name: str, arr: np.ndarray) -> onnx.NodeProto:
        return h.make_node("Constant", [], [name], name=f"const_{name}",
                           value=nh.from_array(arr, name))

    nodes = [
        const("conv_w", _w(rng, channels, 3, 3, 3)), const("conv_b", _w(rng, channels)),
        const("fc_w", _w(rng, channels, classes)), const("fc_b", _w(rng, classes)),
        const("flat_shape", np.array([-1, channels], np.int64)),
        h.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv2d_0",
                    pads=[1, 1, 1, 1], strides=[2, 2]),
        h.make_node("Relu", ["c"], ["r"], name="relu_0"),
        h.make_node("GlobalAveragePool", ["r"], ["p"], name="pool2d_0"),
        h.make_node("Reshape", ["p", "flat_shape"], ["f"], name="reshape2_0"),
        h.make_node("MatMul", ["f", "fc_w"], ["m"], name="matmul_0"),
        h.make_node("Add", ["m", "fc_b"], ["logits"], name="elementwise_add_0"),
        h.make_node("Softmax", ["logits"], ["probs"], name="softmax_0", axis=-1),
    ]
    g = h.make_graph(nodes, "paddle_classifier",
                     [h.make_tensor_value_info("x", T.FLOAT, [-1, 3, -1, -1])],
                     [h.make_tensor_value_info("probs", T.FLOAT, [-1, classes])],
                     value_info=[h.make_tensor_value_info("r", T.FLOAT, [-1, channels, -1, -1]),
                                 h.make_tensor_value_info("f", T.FLOAT, [0, channels])])
    return _model(g, opset=11)


def exact_size_only(side: int = 17) -> onnx.ModelProto:
    """x[N, 3, H, W] -> Reshape to [1, 3*side*side]: runs only at H = W = ``side``."""
    g = h.make_graph(
        [h.make_node("Reshape", ["x", "shape"], ["flat"], name="flatten_exact"),
         h.make_node("MatMul", ["flat", "w"], ["y"], name="fc")],
        "exact_size_only",
        [h.make_tensor_value_info("x", T.FLOAT, ["n", 3, "h", "w"])],
        [h.make_tensor_value_info("y", T.FLOAT, [1, 4])],
        initializer=[nh.from_array(np.array([1, 3 * side * side], np.int64), "shape"),
                     nh.from_array(np.ones((3 * side * side, 4), np.float32), "w")])
    return _model(g)


def bert_encoder(path: Path, vocab: int = 8000, width: int = 128, depth: int = 2,
                 positions: int = 128) -> Path:
    """A BERT-style sentence encoder exported from PyTorch to ``path``: word, position and
    token-type embeddings (LayerNorm), ``depth`` post-norm encoder layers (4 heads, GELU FFN
    4x wide), masked mean pooling. Inputs ``input_ids``/``attention_mask`` int64 [batch, seq];
    output ``sentence`` [batch, width]. The word table (``vocab`` x ``width``) holds most of
    the weight bytes (~70 % at the defaults), as in small sentence-embedding models.
    """
    import torch
    from torch import nn

    torch.manual_seed(7)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.ff1, self.ff2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
            self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = (z.reshape(b, t, 4, -1).transpose(1, 2)
                       for z in self.qkv(x).chunk(3, dim=-1))
            att = torch.softmax(q @ k.transpose(-1, -2) / (width // 4) ** 0.5 + bias, dim=-1)
            x = self.norm1(x + self.out((att @ v).transpose(1, 2).reshape(b, t, width)))
            return self.norm2(x + self.ff2(nn.functional.gelu(self.ff1(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.words = nn.Embedding(vocab, width)
            self.positions = nn.Embedding(positions, width)
            self.types = nn.Embedding(2, width)
            self.norm = nn.LayerNorm(width)
            self.layers = nn.ModuleList(Layer() for _ in range(depth))

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            t = input_ids.shape[1]
            pos = torch.arange(t, device=input_ids.device).unsqueeze(0)
            x = self.norm(self.words(input_ids) + self.positions(pos)
                          + self.types(torch.zeros_like(input_ids)))
            mask = attention_mask.to(x.dtype)
            bias = ((1.0 - mask) * -1e4)[:, None, None, :]
            for layer in self.layers:
                x = layer(x, bias)
            return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)

    module = Encoder().eval()
    with torch.no_grad():  # BERT-like spread: N(0, 0.02) tables as in its initialisation
        for emb in (module.words, module.positions, module.types):
            emb.weight.normal_(0.0, 0.02 * 25)
    ids = torch.randint(0, vocab, (2, 16))
    mask = torch.ones_like(ids)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(module, (ids, mask), str(path), dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["sentence"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                    "attention_mask": {0: "batch", 1: "seq"}},
                      opset_version=17)
    proto = onnx.load(str(path))
    onnx.save_model(proto, str(path), save_as_external_data=False)
    return path


def bn_digits_cnn(path: Path, epochs: int = 2, seed: int = 3) -> tuple[Path, np.ndarray, np.ndarray]:
    """A small CNN trained briefly on scikit-learn's digits (16x16) and exported with its
    BatchNormalization layers kept (as PaddlePaddle and training-mode exports leave them):
    image[batch, 1, 16, 16] -> logits[batch, 10]. Returns (path, train images, test images):
    the running statistics come from the train images only."""
    import torch
    from torch import nn

    from tests.corpus import load_digits_split

    torch.manual_seed(seed)
    x_tr, y_tr, x_te, _ = load_digits_split()

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    model = nn.Sequential(*block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(xt), 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[i:i + 32]), yt[i:i + 32]).backward()
            opt.step()
    model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (xt[:2],), str(path), dynamo=False, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}},
                      opset_version=17, training=torch.onnx.TrainingMode.PRESERVE,
                      do_constant_folding=False)
    return path, x_tr, x_te
