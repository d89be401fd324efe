"""Where a train (or inference) step's time goes: a JAX profiler trace, attributed to the model.

    python benchmarks/profile_step.py --model ViT-Ti_16 --batch 32 [--mode train] [--dtype float32]

Traces a few steps of `vit_jax.benchmark`'s compiled step, sums each XLA op's time (over all
threads: CPU time) and attributes it twice, using the compiled HLO text:
  * by part of the model — from each instruction's `op_name` metadata (the Flax module path:
    query/key/value, attention core, out projection, MLP, LayerNorm, patch embedding, the loss,
    the optimizer update);
  * by kind of work — matmul (the instruction is or fuses a `dot`/`convolution`), softmax/exp,
    other elementwise and reductions, copies/transposes (layout changes).
Prints two Markdown tables for BENCHMARKS.md.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

from vit_jax import benchmark  # noqa: E402

# (part, regex on the op_name metadata); first match wins. Inside the model the op_name holds the
# Flax module path; outside it (optimizer, gradient norm, NaN guard) only `jit(step_fn)/<op>`.
PARTS = [
    ("attention: q/k/v projections", r"Attention_1/(qkv|query|key|value)"),
    ("attention: out projection", r"MultiHeadDotProductAttention_1/out"),
    ("attention: scores, softmax, weighted sum", r"MultiHeadDotProductAttention_1/core"),
    ("attention: rest", r"MultiHeadDotProductAttention_1"),
    ("MLP: matmuls + GELU", r"MlpBlock_3"),
    ("LayerNorm", r"LayerNorm|encoder_norm"),
    ("patch embedding", r"/embedding/"),
    ("head, class token, position embeddings", r"VisionTransformer"),
    ("loss (inside the gradient)", r"jvp\("),
    ("optimizer update, gradient norm, NaN guard", r"."),
]
HLO_LINE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"")
CALLS = re.compile(r"calls=%?([\w.\-]+)")
COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")


def parse_hlo(text: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(instruction -> op_name, instruction -> called computation, computation -> its body)."""
    op_names, calls, bodies = {}, {}, {}
    current, lines = None, []
    for line in text.splitlines():
        m = COMPUTATION.match(line)
        if m:
            current, lines = m.group(1), []
            continue
        if line.startswith("}") and current:
            bodies[current] = "\n".join(lines)
            current = None
            continue
        lines.append(line)
        m = HLO_LINE.match(line)
        if m:
            op_names[m.group(1)] = m.group(2)
        name = line.strip().removeprefix("ROOT ").split(" = ")[0].lstrip("%")
        c = CALLS.search(line)
        if c:
            calls[name] = c.group(1)
    return op_names, calls, bodies


def kind_of(name: str, calls: dict[str, str], bodies: dict[str, str]) -> str:
    body = bodies.get(calls.get(name, ""), "")
    text = name + "\n" + body
    if re.search(r"\bdot\(|convolution\(|^dot|^convolution|custom-call", text):
        return "matmul (dot/conv, with what XLA fused into it)"
    if re.search(r"exponential\(|\bexp", text):
        return "softmax / exp"
    if re.search(r"^(copy|transpose)|copy_bitcast|transpose\(", name + body) and not re.search(
        r"add\(|multiply\(", body
    ):
        return "copy / transpose (layout)"
    return "other elementwise + reductions"


def part_of(op_name: str) -> str:
    for part, pattern in PARTS:
        if re.search(pattern, op_name):
            return part
    return "unattributed (no op_name)"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-Ti_16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--mode", choices=("train", "infer"), default="train")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=0, help="also list the N most expensive ops")
    p.add_argument("--attention", choices=("explicit", "xla"), help="attention core")
    args = p.parse_args()
    case = benchmark.Case(
        args.model,
        batch=args.batch,
        resolution=args.resolution,
        mode=args.mode,
        dtype=args.dtype,
        model_overrides={"attention_implementation": args.attention} if args.attention else {},
    )
    compiled, one_step, _ = benchmark.build_step(case)
    for i in range(2):
        jax.block_until_ready(one_step(i))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for i in range(args.steps):
                jax.block_until_ready(one_step(2 + i))
        (path,) = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    op_names, calls, bodies = parse_hlo(compiled.as_text())
    by_part, by_kind, by_op = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name not in op_names and name not in calls:
            continue  # runtime bookkeeping, Python frames
        us = float(e.get("dur", 0))
        by_part[part_of(op_names.get(name, ""))] += us
        by_kind[kind_of(name, calls, bodies)] += us
        op = re.sub(r"encoderblock_\d+", "encoderblock_*", op_names.get(name, ""))
        by_op[(re.sub(r"\.\d+$", "", name), op[-70:], kind_of(name, calls, bodies)[:6])] += us
    total = sum(by_part.values())
    print(
        f"{args.model} batch {args.batch} @{args.resolution} {args.mode} {args.dtype}: "
        f"{total / 1e6 / args.steps:.2f} s of op time per step (all threads)\n"
    )
    for title, counts in (("part of the model", by_part), ("kind of work", by_kind)):
        print(f"| {title} | share of op time |\n|---|---:|")
        for key, us in counts.most_common():
            print(f"| {key} | {us / total:.1%} |")
        print()
    if args.top:
        print("| op (all layers) | op_name | kind | share |\n|---|---|---|---:|")
        for (name, op, kind), us in by_op.most_common(args.top):
            print(f"| {name} | {op} | {kind} | {us / total:.1%} |")


if __name__ == "__main__":
    main()
