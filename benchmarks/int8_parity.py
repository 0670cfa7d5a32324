"""How int8 quantisation choices keep the float32 export's answers, on every input of a shard folder.

    microdistill export --student runs/default/student --out runs/default/export-f32
    python benchmarks/int8_parity.py --export runs/default/export-f32 --data runs/default/shards

Each variant quantises the float32 graph with onnxruntime's dynamic quantisation and answers
every example of `--data` (the held-out split, then all) beside the float32 graph, which
answers as PyTorch does (export checks that). Prints, per variant: answers kept on the
held-out split and on all, the file size against float32, and p50 latency at batch 1 on 64
inputs. Torch is not needed.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, required=True, help="a float32 export folder of a heads student")
    ap.add_argument("--data", type=Path, required=True, help="shard folder whose inputs are answered")
    args = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's pre-processing advice is for image models
    exported = load_exported(args.export)
    src = args.export / "model.onnx"
    model = onnx.load(str(src))
    outputs = [o.name for o in model.graph.output]
    n_layers = 1 + max(int(n.name.split("layer.")[1].split("/")[0]) for n in model.graph.node if "layer." in n.name)
    shards = ShardSet(args.data)
    records = list(shards.records())
    val = [i for i, r in enumerate(records) if r.split == "val"]
    texts = clean_inputs(exported.task, [r.text for r in records])
    ids = [x[:exported.max_length] for x in exported.encode(texts)]
    ref = answers(ort.InferenceSession(str(src), session_options()), exported, ids)
    variants = {
        "per-channel, 7-bit (the export's)": {"per_channel": True, "reduce_range": True},
        "per-tensor, 8-bit": {"per_channel": False, "reduce_range": False},
        "per-channel, 8-bit": {"per_channel": True, "reduce_range": False},
        "per-channel, 7-bit, heads float32": {"per_channel": True, "reduce_range": True,
                                              "nodes_to_exclude": head_nodes(model, outputs)},
        "per-channel, 7-bit, last layer float32": {"per_channel": True, "reduce_range": True,
                                                   "nodes_to_exclude": head_nodes(model, outputs)
                                                   + layer_nodes(model, [n_layers - 1])},
        "per-channel, 7-bit, MatMul only": {"per_channel": True, "reduce_range": True, "op_types_to_quantize": ["MatMul"]},
    }
    size = src.stat().st_size
    print(f"{len(records)} inputs ({len(val)} held out), {n_layers} encoder layers; float32 {size / 1e6:.1f} MB, "
          f"p50 {p50_ms(ort.InferenceSession(str(src), session_options()), exported, ids[:64]):.2f} ms")
    print(f"{'variant':42s} {'held-out':>10s} {'all':>12s} {'size':>6s} {'p50 ms':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in variants.items():
            out = Path(tmp) / "q.onnx"
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, **options)
            session = ort.InferenceSession(str(out), session_options())
            got = answers(session, exported, ids)
            same_val = sum(got[i] == ref[i] for i in val)
            same = sum(a == b for a, b in zip(got, ref))
            print(f"{name:42s} {same_val:4d}/{len(val):<5d} {same:5d}/{len(ids):<6d} {out.stat().st_size / size:6.2f} "
                  f"{p50_ms(session, exported, ids[:64]):7.2f}", flush=True)


if __name__ == "__main__":
    main()
