"""Where a training step's time goes: sam-cls against the same encoder as a softmax classifier, phase by phase.

    python benchmarks/profile_step.py                      # CIFAR-10 (JPEG copy) / conv1 from ../shared/data
    python benchmarks/profile_step.py --quick              # synthetic 3x32x32 images, a few seconds

Both trainers run the product's own train_epoch under torch.profiler; the phases are the record_function
labels it carries (batch, encoder, read (search included), backward, optimizer, memory write, index
refresh). Each trainer first trains --steps unprofiled (the step time quoted), then --steps more profiled
(the breakdown; the profiler adds its own overhead, so shares are what to read there). The two trainers
alternate, three rounds, and medians are reported. Writes results/profile_step.json.
"""

from __future__ import annotations

import argparse
import statistics

from common import CIFAR10_DIR, conv1_run, trainer, write_report
from torch.profiler import ProfilerActivity, profile

from sam_cls.train import Trainer

# ----------------------------------------------------------------------------- hyper-parameters, all here
PHASES = ("batch", "encoder", "read", "search", "backward", "optimizer", "memory write", "index refresh")
ROUNDS = 3
QUICK_STEPS = 8


def timed(t: Trainer, steps: int) -> float:
    """ms per training step, as the trainer's own step clock measures it."""
    spent = t.train_seconds
    t.train_epoch(max_steps=steps)
    return 1000 * (t.train_seconds - spent) / steps


def profiled(t: Trainer, steps: int) -> dict[str, float]:
    """ms per step of each labelled phase, from torch.profiler's CPU totals."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t.train_epoch(max_steps=steps)
    totals = {e.key: e.cpu_time_total / 1000 for e in prof.key_averages() if e.key in PHASES}
    return {phase: totals.get(phase, 0.0) / steps for phase in PHASES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=CIFAR10_DIR, help="CIFAR-10 in image-folder layout")
    ap.add_argument("--steps", type=int, default=100, help="training steps per measurement")
    ap.add_argument("--encoder", default="conv1")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/profile_step.json")
    args = ap.parse_args()
    # A schedule long enough that the measured steps sit near full learning rate, past warm-up.
    options, data = conv1_run(args.data_dir, args.quick, encoder=args.encoder, epochs=100, warmup_epochs=0.0)
    steps = min(args.steps, QUICK_STEPS) if args.quick else args.steps
    trainers = {"sam-cls": trainer(options), "softmax": trainer(options, head="softmax")}
    step_ms: dict[str, list[float]] = {name: [] for name in trainers}
    phases: dict[str, list[dict]] = {name: [] for name in trainers}
    for _ in range(ROUNDS):  # alternating, so drifting machine load hits both alike
        for name, t in trainers.items():
            step_ms[name].append(timed(t, steps))
            phases[name].append(profiled(t, steps))
    rows = {}
    for name in trainers:
        rows[name] = {"step_ms": round(statistics.median(step_ms[name]), 2),
                      "phases_ms_profiled": {p: round(statistics.median(r[p] for r in phases[name]), 2) for p in PHASES}}
    overhead = rows["sam-cls"]["step_ms"] - rows["softmax"]["step_ms"]
    index = trainers["sam-cls"].refresher.description
    print(f"{data}, encoder {args.encoder}, batch {trainers['sam-cls'].cfg.batch_size}, index {index}")
    print(f"{'phase (ms/step, profiled; read includes search)':28s} {'sam-cls':>9s} {'softmax':>9s}")
    for p in PHASES:
        print(f"{p:28s} {rows['sam-cls']['phases_ms_profiled'][p]:9.2f} {rows['softmax']['phases_ms_profiled'][p]:9.2f}")
    print(f"{'step (unprofiled, median)':28s} {rows['sam-cls']['step_ms']:9.2f} {rows['softmax']['step_ms']:9.2f}")
    print(f"memory overhead {overhead:.1f} ms/step; throughput ratio {rows['softmax']['step_ms'] / rows['sam-cls']['step_ms']:.3f}")
    write_report({"data": data, "encoder": args.encoder, "batch_size": trainers["sam-cls"].cfg.batch_size,
                  "index": index, "rounds": ROUNDS, "steps_per_measurement": steps, "rows": rows,
                  "ratio": round(rows["softmax"]["step_ms"] / rows["sam-cls"]["step_ms"], 3)}, args.out)


if __name__ == "__main__":
    main()
