#!/usr/bin/env python3
"""Summarizes a trace that `training.profile_steps` wrote (Chrome/Perfetto
JSON, one per rank): time per ftune:: range, the top GPU kernels and CPU ops,
and how busy the GPU was over the traced steps.

    python3 tests/gpu/trace_summary.py OUTPUT_DIR/profile/rank-0-steps-5-7.trace.json [--top 15]

Ranges nest (a layer's forward contains its attention and LoRA), so their
times overlap; kernel times do not (one stream at a time is summed per
stream).
"""
import argparse
import collections
import json
import sys


def load(path):
    with open(path) as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    events = [e for e in load(args.trace) if e.get("ph") == "X" and "dur" in e]
    if not events:
        sys.exit("trace_summary: no complete events in %s" % args.trace)
    ranges = collections.defaultdict(lambda: [0, 0.0])
    kernels = collections.defaultdict(lambda: [0, 0.0])
    ops = collections.defaultdict(lambda: [0, 0.0])
    steps = []
    for e in events:
        name, dur, cat = e.get("name", ""), float(e["dur"]), e.get("cat", "")
        if name.startswith("ftune::") and cat in ("user_annotation", "cpu_op"):
            # The host side of a range (Kineto also projects it onto the GPU
            # timeline as gpu_user_annotation).
            ranges[name][0] += 1
            ranges[name][1] += dur
            if name == "ftune::step":
                steps.append((float(e["ts"]), float(e["ts"]) + dur))
        elif cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            kernels[name][0] += 1
            kernels[name][1] += dur
        elif cat in ("cpu_op", "") and name.startswith("aten::"):
            ops[name][0] += 1
            ops[name][1] += dur
    wall = sum(b - a for a, b in steps)
    print("%d traced steps, %.1f ms of step time on the host" % (len(steps), wall / 1e3))

    def table(title, rows, total=None):
        print("\n%s" % title)
        for name, (n, us) in sorted(rows.items(), key=lambda kv: -kv[1][1])[: args.top]:
            share = " %5.1f%%" % (100 * us / total) if total else ""
            print("  %10.2f ms %6d x%s  %s" % (us / 1e3, n, share, name[:110]))

    table("ftune ranges (nested: times overlap)", ranges, wall or None)
    gpu_total = sum(us for _, us in kernels.values())
    if kernels:
        print("\nGPU busy %.1f ms (%.0f%% of the traced step time)"
              % (gpu_total / 1e3, 100 * gpu_total / wall if wall else 0))
        table("GPU kernels and copies", kernels, gpu_total)
    table("CPU ops (aten::, nested: times overlap)", ops, wall or None)
    gaps(events, steps)


def gaps(events, steps, top=8):
    """The GPU's idle time inside the traced steps: the spans between one
    kernel's end and the next one's start (on any stream), with the kernels
    on either side, largest first."""
    gpu = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("name", ""))
                 for e in events if e.get("cat", "") in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not gpu or not steps:
        return
    idle = []
    for a, b in steps:
        inside = [k for k in gpu if k[0] < b and k[1] > a]
        if not inside:
            continue
        end, before = a, "(step start)"
        for start, stop, name in inside:
            if start > end:
                idle.append((start - end, before, name))
            if stop > end:
                end, before = stop, name
        if b > end:
            idle.append((b - end, before, "(step end)"))
    total = sum(d for d, _, _ in idle)
    print("\nGPU idle inside the steps: %.2f ms in %d gaps; %.2f ms in gaps over 50 us"
          % (total / 1e3, len(idle), sum(d for d, _, _ in idle if d > 50) / 1e3))
    for d, before, after in sorted(idle, reverse=True)[:top]:
        print("  %8.3f ms  after %s  before %s" % (d / 1e3, before[:60], after[:60]))


if __name__ == "__main__":
    main()
