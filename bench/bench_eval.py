"""Evaluation benchmark on CIFAR-10: linear top-1 and 1% / 10% semi-supervised top-1 per encoder.

    .venv/bin/python bench/bench_eval.py --data ../shared/data \\
        [--pretrain relicv2=runs/pretrain/relicv2-cifar10-resnet18] \\
        [--pretrain supervised=runs/pretrain/supervised-cifar10-resnet18] \\
        [--arch resnet18 --width 1 --stem cifar] [--semi-epochs 30[,10]] [--skip-semi] [--skip-random]

Every encoder given with --pretrain, plus `random:ARCH` (the random-init baseline, built with the
same --arch/--width/--stem; pass the pretrain's own values), is evaluated with
- `relicv2 eval linear ENCODER cifar10:DIR` (cached features, L-BFGS, L2 from the default grid);
- `relicv2 eval semi ENCODER cifar10:DIR --fraction 0.01` and `--fraction 0.1` (same seed: the same
  labelled images for every encoder).
Each stage runs as its own `python -m relicv2_cli` process; the exact commands, wall times and
metrics go to bench/results/eval.json and a Markdown table to bench/results/eval.md. An artifact
that already exists and was made by the same command is reused (the bench is resumable); one made
with other options is rerun; --force reruns everything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_stage(args: list[str], force: bool) -> tuple[dict, float, str]:
    """Run `python -m relicv2_cli ARGS`; reuse the artifact when it exists (unless force)."""
    workdir = Path(args[args.index("--workdir") + 1])
    kind = args[1] if args[0] in ("eval", "analyze") else args[0]  # the artifact kind names the folder
    name = args[args.index("--name") + 1]
    path = workdir / kind / name
    command = " ".join(shlex.quote(a) for a in ["relicv2", *args])
    if path.exists() and not force:
        manifest = json.loads((path / "manifest.json").read_text())
        if [a for a in manifest.get("command", [])[1:] if a != "--force"] == [str(a) for a in args]:
            return manifest, float(manifest["metrics"].get("seconds", float("nan"))), command
        force = True  # same name, other options: rerun
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "relicv2_cli", *args, *(["--force"] if force else [])],
                          cwd=ROOT, stderr=None, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {command}")
    manifest = json.loads((Path(proc.stdout.strip().splitlines()[-1]) / "manifest.json").read_text())
    return manifest, wall, command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("RELICV2_DATA",
                                                         str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--pretrain", action="append", default=[], metavar="LABEL=ARTIFACT")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width", default="1")
    parser.add_argument("--stem", default="cifar")
    parser.add_argument("--semi-epochs", default="30", help="one value, or one per fraction (e.g. 30,10)")
    parser.add_argument("--semi-batch", default=None, help="default: the stage's own (64)")
    parser.add_argument("--fractions", default="0.01,0.1")
    parser.add_argument("--skip-semi", action="store_true")
    parser.add_argument("--skip-random", action="store_true")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench-eval"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval.json"))
    args = parser.parse_args()

    spec = f"cifar10:{args.data}"
    encoders = [] if args.skip_random else [("random init", f"random:{args.arch}")]
    for item in args.pretrain:
        label, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--pretrain wants LABEL=ARTIFACT, got {item!r}")
        encoders.append((label, path))
    model = ["--arch", args.arch, "--width", args.width, "--stem", args.stem]
    common = ["--workdir", args.workdir, "--device", args.device]
    results = []
    for label, encoder in encoders:
        tag = label.replace(" ", "-")
        manifest, wall, command = run_stage(
            ["eval", "linear", encoder, spec, *model, *common, "--name", f"{tag}-linear"], args.force)
        m = manifest["metrics"]
        results.append({"encoder": label, "spec": encoder, "protocol": "linear (cached, L-BFGS)",
                        "top1": m["top1"],
                        "top5": m["top5"], "l2": m.get("l2"), "features_s": m.get("features_seconds"),
                        "solver_s": m.get("solver_seconds"), "wall_s": round(wall, 1), "command": command})
        print(json.dumps(results[-1]), flush=True)
        if args.skip_semi:
            continue
        fractions = args.fractions.split(",")
        epochs = args.semi_epochs.split(",")
        epochs = epochs * len(fractions) if len(epochs) == 1 else epochs
        for fraction, n_epochs in zip(fractions, epochs, strict=True):
            manifest, wall, command = run_stage(
                ["eval", "semi", encoder, spec, "--fraction", fraction, "--epochs", n_epochs,
                 *(["--batch-size", args.semi_batch] if args.semi_batch else []), *model, *common, "--name",
                 f"{tag}-semi-{fraction}"], args.force)
            m = manifest["metrics"]
            results.append({"encoder": label, "spec": encoder, "protocol": f"semi {float(fraction) * 100:g}%",
                            "top1": m["top1"], "top5": m["top5"], "labelled": m["subset_size"],
                            "subset_sha256": m["subset_sha256"][:16], "steps": m["steps"],
                            "train_s": m["train_seconds"], "wall_s": round(wall, 1), "command": command})
            print(json.dumps(results[-1]), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "torch_threads": os.environ.get("OMP_NUM_THREADS", "default")}
    out.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    lines = ["| encoder | protocol | top-1 | top-5 | notes | wall |", "|---|---|---|---|---|---|"]
    for r in results:
        if r["protocol"].startswith("linear"):
            solver_s = sum(r["solver_s"].values())
            note = f"L2 {r['l2']:.2g}; features {r['features_s']:.0f} s, solver {solver_s:.0f} s"
        else:
            note = f"{r['labelled']} labels, {r['steps']} steps"
        lines.append(f"| {r['encoder']} | {r['protocol']} | {100 * r['top1']:.2f} | {100 * r['top5']:.2f} | "
                     f"{note} | {r['wall_s']:.0f} s |")
    table = "\n".join(lines)
    commands = "\n".join(f"    {r['command']}" for r in results)
    out.with_suffix(".md").write_text(table + "\n\nCommands:\n\n" + commands + "\n")
    print(table)


if __name__ == "__main__":
    main()
