"""How int8 quantisation choices keep the float32 export's answers, on the training inputs and on new text.

    microdistill export --student runs/default/student --out runs/default/export-f32
    python benchmarks/int8_parity.py --export runs/default/export-f32 --data runs/default/shards \
        [--also runs/tweets/shards] [--probe]

Each variant quantises the float32 graph (onnxruntime's dynamic quantisation, or static QDQ
calibrated on `--data`'s training inputs) and answers every example of `--data` (the held-out
split, then all), of each `--also` folder (text unlike the training inputs) and, with
`--probe`, the packaged probe texts export checks, beside the float32 graph, which answers as
PyTorch does (export checks that). Prints, per variant: answers kept on each set, the file
size against float32, and p50 latency at batch 1 on 64 inputs. Torch is not needed.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from microdistill.data.corpus import clean_inputs
from microdistill.runtime import load_exported
from microdistill.runtime.common import session_options
from microdistill.data.samples import probe_texts
from microdistill.data.shards import ShardSet


def head_nodes(model: onnx.ModelProto, outputs: list[str]) -> list[str]:
    """The nodes that compute the graph outputs directly or one step before: the per-field heads."""
    producer = {o: n for n in model.graph.node for o in n.output}
    names, frontier = set(), list(outputs)
    for _ in range(3):  # output <- Add(bias) <- MatMul, plus one more step for safety
        nxt = []
        for o in frontier:
            n = producer.get(o)
            if n is not None and n.name not in names:
                names.add(n.name)
                nxt += list(n.input)
        frontier = nxt
    return sorted(names)


def layer_nodes(model: onnx.ModelProto, layers: list[int]) -> list[str]:
    """MatMul nodes of the given encoder layers (torch names them .../layer.K/...)."""
    return [n.name for n in model.graph.node if n.op_type == "MatMul"
            and any(f"layer.{k}/" in n.name for k in layers)]


class Batches:
    """Static quantisation's calibration inputs: the training inputs, a batch at a time."""

    def __init__(self, ids: list[list[int]], size: int = 16):
        import numpy as np

        self.feeds = []
        for i in range(0, len(ids), size):
            chunk = ids[i:i + size]
            x = np.zeros((len(chunk), max(len(c) for c in chunk)), np.int64)
            mask = np.zeros_like(x)
            for row, c in enumerate(chunk):
                x[row, :len(c)], mask[row, :len(c)] = c, 1
            self.feeds.append({"input_ids": x, "attention_mask": mask})
        self.it = iter(self.feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)


def answers(session, exported, ids: list[list[int]]) -> list[tuple[int, ...]]:
    exported.session = session
    logits = exported.logits(ids)
    return [tuple(int(z[i].argmax()) for z in logits) for i in range(len(ids))]


def p50_ms(session, exported, ids: list[list[int]]) -> float:
    exported.session = session
    exported.logits(ids[:1])
    ms = []
    for x in ids:
        t0 = time.perf_counter()
        exported.logits([x])
        ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ms)


def variants(model: onnx.ModelProto, outputs: list[str], n_layers: int) -> dict[str, dict]:
    heads = head_nodes(model, outputs)
    out = {
        "per-channel, 7-bit (the export's)": {"per_channel": True, "reduce_range": True},
        "per-tensor, 8-bit": {"per_channel": False, "reduce_range": False},
        "per-channel, 8-bit": {"per_channel": True, "reduce_range": False},
        "per-channel, 7-bit, heads float32": {"per_channel": True, "reduce_range": True, "nodes_to_exclude": heads},
        "per-channel, 7-bit, MatMul only": {"per_channel": True, "reduce_range": True, "op_types_to_quantize": ["MatMul"]},
        "static QDQ, per-channel, calibrated": {"static": True},
    }
    for k in range(n_layers):  # which layer is the sensitive one: each in float32 in turn
        out[f"per-channel, 7-bit, layer {k} float32"] = {"per_channel": True, "reduce_range": True,
                                                         "nodes_to_exclude": heads + layer_nodes(model, [k])}
    return out


def quantize(src: Path, out: Path, options: dict, calibration: list[list[int]]) -> None:
    if options.get("static"):
        from onnxruntime.quantization import QuantFormat, quantize_static

        quantize_static(str(src), str(out), Batches(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QInt8)
    else:
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, **options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, required=True, help="a float32 export folder of a heads student")
    ap.add_argument("--data", type=Path, required=True, help="shard folder whose inputs are answered")
    ap.add_argument("--also", type=Path, action="append", default=[], help="more shard folders: text unlike --data's")
    ap.add_argument("--probe", action="store_true", help="also the packaged probe texts")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's pre-processing advice is for image models
    exported = load_exported(args.export)
    src = args.export / "model.onnx"
    model = onnx.load(str(src))
    outputs = [o.name for o in model.graph.output]
    n_layers = 1 + max(int(n.name.split("layer.")[1].split("/")[0]) for n in model.graph.node if "layer." in n.name)
    encode = lambda texts: [x[:exported.max_length] for x in exported.encode(clean_inputs(exported.task, texts))]  # noqa: E731
    records = list(ShardSet(args.data).records())
    sets = {"held-out": encode([r.text for r in records if r.split == "val"]), "all": encode([r.text for r in records])}
    sets |= {p.name if p.name != "shards" else p.parent.name: encode([r.text for r in ShardSet(p).records()])
             for p in args.also}
    if args.probe:
        sets["probe"] = encode(probe_texts())
    calibration = encode([r.text for r in records if r.split == "train"])
    float32 = ort.InferenceSession(str(src), session_options())
    ref = {name: answers(float32, exported, ids) for name, ids in sets.items()}
    size = src.stat().st_size
    print(f"{', '.join(f'{k} {len(v)}' for k, v in sets.items())} inputs; {n_layers} encoder layers; float32 "
          f"{size / 1e6:.1f} MB, p50 {p50_ms(float32, exported, sets['all'][:64]):.2f} ms")
    print(f"{'variant':42s} " + " ".join(f"{k:>12s}" for k in sets) + f" {'size':>6s} {'p50 ms':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in variants(model, outputs, n_layers).items():
            out = Path(tmp) / "q.onnx"
            quantize(src, out, options, calibration)
            session = ort.InferenceSession(str(out), session_options())
            kept = [f"{sum(a == b for a, b in zip(answers(session, exported, ids), ref[k])):5d}/{len(ids):<6d}"
                    for k, ids in sets.items()]
            print(f"{name:42s} " + " ".join(kept) + f" {out.stat().st_size / size:6.2f} "
                  f"{p50_ms(session, exported, sets['all'][:64]):7.2f}", flush=True)


if __name__ == "__main__":
    main()
