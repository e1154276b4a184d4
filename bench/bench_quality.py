"""Quality at a fixed training budget on CIFAR-10: kNN and linear top-1 per method, and 1% labels.

Every method trains for the same --budget minutes (time inside training steps; evaluation excluded)
on the same network (ResNet-18 cifar stem, --width, default 0.25 so that a budget of minutes means
more than a few hundred steps on a CPU), then every encoder is evaluated the same way:

    relicv2 saliency cifar10:DIR                                      (precomputed once, not in the budget)
    relicv2 pretrain cifar10:DIR --method M [--saliency S] --time-budget B --epochs E --warmup-epochs E/10
    python bench/lightly_byol.py's loop for B minutes        (lightly's BYOL example, our backbone)
    relicv2 analyze neighbors ENCODERS... cifar10:DIR        (weighted kNN k=20 T=0.07, all test images)
    relicv2 analyze ratios ENCODERS... cifar10:DIR
    relicv2 eval linear ENCODER cifar10:DIR                  (cached features, L-BFGS, L2 on held-out)
    relicv2 eval semi ENCODER cifar10:DIR --fraction 0.01 | 0.1  (semi's defaults; RELICv2 + masks and
                                                             random init on the same 500 / 5,000 images)

E, the epochs the schedule spans, is set per method from a 6-step speed measurement so that the
cosine schedule ends just after the budget (our learning-rate and EMA schedules, lightly's EMA schedule).
Methods: RELICv2 with saliency masks, RELICv2 without, our BYOL, lightly's BYOL, supervised, and
random init (no training). Writes bench/results/quality.json and quality.md. Resumable: finished
stages are reused when their command is unchanged (see bench_eval.run_stage); --force reruns.

    python bench/bench_quality.py                       # about an hour: 5 x 10 min + evaluation
    python bench/bench_quality.py --budget 2 --skip-semi  # a quick look

--steps N trains every method of ours for exactly N steps instead (schedule sized to N): the result no
longer depends on how busy the machine is, which a comparison of recipes needs. --pretrain-args adds
options to every pretrain of ours and --tag suffixes the run names, so that two recipes can be measured
side by side in one work folder:

    python bench/bench_quality.py --steps 450 --methods relicv2-masks,relicv2,byol --skip-lightly \
        --skip-semi --tag old --pretrain-args "--jitter torchvision --bn-stats joint --head-bias"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench_eval import ROOT, run_stage
from bench_pretrain import matmul_tflops
from lightly_byol import lightly_version

N_TRAIN = 50_000


def our_rate(spec: str, method_args: list[str], net: list[str], steps: int = 20) -> float:
    """Images/s of our pretrain for these options: total images / total time of steps 5-20 of a run on
    5,000 images (single steps vary by +-30% on a shared 2-core machine; 4 steps misjudged BYOL by 1.5x)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "relicv2_cli", "pretrain", spec, *method_args, *net,
                        "--max-steps", str(steps),
                        "--log-every", "1", "--eval-every", "0", "--limit-train", "5000", "--limit-test",
                        "100",
                        "--workdir", tmp, "--name", "rate", "--quiet"], cwd=ROOT, check=True,
                        stdout=subprocess.DEVNULL)
        log = Path(tmp) / "pretrain" / "rate" / "metrics.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r and r["step"] >= 5]
    return len(rates) / sum(1 / r for r in rates)  # harmonic mean: images over time


def run_lightly(data: str, workdir: Path, budget_min: float, width: float, backbone: str, force: bool,
                n_train: int) -> dict:
    """lightly's BYOL example for the budget; the encoder is saved for `torchvision:` evaluation."""
    import lightly_byol
    import torch

    out = workdir / f"lightly-byol-{backbone}"
    config = {"budget_min": budget_min, "width": width, "backbone": backbone, "data": data,
              "n_train": n_train}
    done = out / "result.json"
    if done.exists() and not force and json.loads(done.read_text())["config"] == config:
        return json.loads(done.read_text())
    torch.manual_seed(0)
    model, resnet = lightly_byol.build(backbone, width)
    loader = lightly_byol.make_loader(data, limit=n_train)
    # 6 steps to measure the speed (steps 3-6: the first ones start the workers), then the example's
    # schedule in whole epochs, rounded up so that the budget, not the schedule, ends the run.
    device = "cuda" if torch.cuda.is_available() else "cpu"  # as the example chooses
    seconds: list[float] = []
    lightly_byol.train(lightly_byol.build(backbone, width)[0], loader, epochs=1, max_steps=6, device=device,
                       on_step=lambda step, _data_s, step_s: seconds.append(step_s) if step > 2 else None)
    rate = loader.batch_size * len(seconds) / sum(seconds)
    epochs = max(1, math.ceil(1.05 * budget_min * 60 * rate / n_train))
    result = lightly_byol.train(model, loader, epochs=epochs, budget_s=budget_min * 60, device=device)
    encoder = lightly_byol.save_encoder(resnet, out / "encoder.pt")
    summary = {"config": config, "epochs_scheduled": epochs, "encoder": str(encoder), **result,
               "images_per_s": result["images"] / result["train_s"]}
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _machine_speed() -> float:
    import torch

    return round(matmul_tflops(torch.device("cuda" if torch.cuda.is_available() else "cpu")), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("RELICV2_DATA",
                                                         str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--budget", type=float, default=10.0, help="training minutes per method")
    parser.add_argument("--width", default="0.25")
    parser.add_argument("--lightly-backbone", default="ours", choices=("ours", "example"),
                        help="ours: the same ResNet-18 (cifar stem, --width); example: torchvision resnet18 "
                             "as lightly's example")
    parser.add_argument("--limit-train", type=int, default=None, help="first N training images (a smoke run)")
    parser.add_argument("--limit-test", type=int, default=None, help="first N test images (a smoke run)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train our methods for exactly this many steps instead of --budget minutes")
    parser.add_argument("--methods", default="relicv2-masks,relicv2,byol,supervised",
                        help="which of our methods to train (comma-separated names)")
    parser.add_argument("--pretrain-args", default="", help="extra options for every pretrain of ours")
    parser.add_argument("--tag", default="", help="suffix of run names (a second recipe in one workdir)")
    parser.add_argument("--skip-semi", action="store_true")
    parser.add_argument("--skip-lightly", action="store_true")
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench-quality"))
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    args = parser.parse_args()
    if not (Path(args.data) / "cifar-10-batches-py").is_dir():
        raise SystemExit(f"CIFAR-10 not found under {args.data} (set RELICV2_DATA)")

    started = datetime.now(UTC).isoformat(timespec="seconds")
    spec, wd = f"cifar10:{args.data}", Path(args.workdir)
    n_train = args.limit_train or N_TRAIN
    limits = [*(["--limit-train", str(args.limit_train)] if args.limit_train else []),
              *(["--limit-test", str(args.limit_test)] if args.limit_test else [])]
    common = [*limits, "--workdir", str(wd), "--quiet"]
    net = ["--arch", "resnet18", "--width", args.width, "--stem", "cifar"]
    saliency, saliency_s, saliency_cmd = run_stage(["saliency", spec, *common, "--name", "cifar10"],
                                                   args.force)
    methods = [
        ("RELICv2 + saliency masks", "relicv2-masks", ["--method", "relicv2", "--saliency",
                                                       str(wd / "saliency" / "cifar10")]),
        ("RELICv2, no masks", "relicv2", ["--method", "relicv2"]),
        ("BYOL (ours)", "byol", ["--method", "byol"]),
        ("supervised (labels)", "supervised", ["--method", "supervised"]),
    ]
    unknown = set(args.methods.split(",")) - {name for _, name, _ in methods}
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}")
    methods = [m for m in methods if m[1] in args.methods.split(",")]
    extra, tag = shlex.split(args.pretrain_args), f"-{args.tag}" if args.tag else ""
    # Measured speeds are kept, so that a rerun of the bench computes the same --epochs and reuses runs.
    rates_file = wd / "rates.json"
    rates = json.loads(rates_file.read_text()) if rates_file.exists() and not args.force else {}
    rows, commands = [], [saliency_cmd]
    for label, name, method_args in methods:
        # masking costs little: the speed of the method without masks stands in for it
        key = f"{method_args[1]} w{args.width} n{n_train}"
        if key not in rates and not args.steps:
            rates[key] = our_rate(spec, method_args[:2], net)
            rates_file.write_text(json.dumps(rates, indent=2) + "\n")
        rate = rates.get(key)
        machine_tflops = _machine_speed()  # a slow spell of a shared host shows here
        if args.steps:  # the schedule spans exactly --steps steps (ceil(epochs * steps per epoch))
            epochs = args.steps / (n_train // 256) - 1e-9
            length = ["--epochs", f"{epochs:.9f}", "--warmup-epochs", f"{epochs / 10:.4f}"]
        else:  # 5% over: the budget, not the schedule, ends the run
            epochs = round(1.05 * args.budget * 60 * rate / n_train, 2)
            length = ["--time-budget", f"{args.budget:g}", "--epochs", f"{epochs:g}",
                      "--warmup-epochs", f"{epochs / 10:.3g}"]
        manifest, wall, command = run_stage(
            ["pretrain", spec, *method_args, *net, *length, "--eval-every", "0", "--checkpoint-every", "200",
             *extra, *common, "--name", name + tag], args.force)
        m = manifest["metrics"]
        rows.append({"method": label + (f" [{args.tag}]" if tag else ""), "name": name + tag,
                     "encoder": str(wd / "pretrain" / (name + tag)),
                     "steps": m["steps"], "epochs": m["epochs"],
                     "train_min": round(m["train_s"] / 60, 2),
                     "images_per_s": round(m["steps"] * 256 / m["train_s"], 1),
                     "schedule_done": round(m["steps"] / manifest["config"]["total_steps"], 2),
                     # only for runs made now (not reused): the machine's speed just before training
                     "matmul_tflops_before": machine_tflops if manifest["created"] >= started else None,
                     "pretrain_knn_top1": m.get("knn_top1")})
        commands.append(command)
        print(json.dumps(rows[-1]), flush=True)
    if not args.skip_lightly:
        machine_tflops = _machine_speed()
        result = run_lightly(args.data, wd, args.budget, float(args.width), args.lightly_backbone, args.force,
                             n_train)
        rows.append({"method": f"BYOL (lightly {lightly_version()} example)", "name": "lightly-byol",
                     "encoder": f"torchvision:{result['encoder']}",
                     "steps": result["steps"], "epochs": round(result["images"] / n_train, 3),
                     "train_min": round(result["train_s"] / 60, 2),
                     "images_per_s": round(result["images_per_s"], 1),
                     "schedule_done": round(result["steps"] / (result["epochs_scheduled"] * (n_train // 256)),
                                            2),
                     "matmul_tflops_before": machine_tflops,
                     "model_args": (["--arch", "resnet18", "--width", "1", "--stem", "imagenet"]
                                    if args.lightly_backbone == "example" else [])})
        commands.append(f"python bench/bench_quality.py (lightly_byol.train, {args.budget:g} min, backbone "
                        f"{args.lightly_backbone})")
    run_label = f"steps-{args.steps}{tag}" if args.steps else f"budget-{args.budget:g}min{tag}"
    rows.append({"method": "random init", "name": "random", "encoder": "random:resnet18", "steps": 0,
                 "epochs": 0, "train_min": 0})

    # kNN for every encoder in one call (one figure), then the linear probe per encoder.
    same_net = [r for r in rows if not r.get("model_args")]
    analysis = {}
    for stage in ("neighbors", "ratios"):
        manifest, _, command = run_stage(["analyze", stage, *[r["encoder"] for r in same_net], spec, *net,
                                          *common,
                                          "--name", run_label], args.force)
        analysis[stage] = manifest["metrics"]
        commands.append(command)
    by_label = analysis["neighbors"]["encoders"]
    for row, label in zip(same_net, by_label, strict=True):
        row["knn_top1"] = by_label[label]["knn_top1"]
        row["ratio_median"] = analysis["ratios"]["encoders"][label]["ratio_median"]
    for row in rows:
        model_args = row.get("model_args") or net
        if "knn_top1" not in row:  # a lightly example backbone of another shape: kNN from its own call
            manifest, _, command = run_stage(["analyze", "neighbors", row["encoder"], spec, *model_args,
                                              *common,
                                              "--name", "budget-lightly-example"], args.force)
            row["knn_top1"] = next(iter(manifest["metrics"]["encoders"].values()))["knn_top1"]
            commands.append(command)
        manifest, wall, command = run_stage(["eval", "linear", row["encoder"], spec, *model_args, *common,
                                             "--name", f"{row['name']}-linear"], args.force)
        row.update(linear_top1=manifest["metrics"]["top1"], linear_top5=manifest["metrics"]["top5"])
        commands.append(command)
        print(json.dumps(row), flush=True)

    semi = []
    if not args.skip_semi:  # RELICv2 + masks against training from scratch, the same images, semi's defaults
        for fraction in ("0.01", "0.1"):
            for row in (rows[0], rows[-1]):
                name = f"{row['name']}-semi-{fraction}"
                manifest, wall, command = run_stage(["eval", "semi", row["encoder"], spec, "--fraction",
                                                     fraction, *net, *common, "--name", name], args.force)
                m = manifest["metrics"]
                semi.append({"encoder": row["method"], "fraction": float(fraction), "top1": m["top1"],
                             "top5": m["top5"], "frozen_linear_top1": m["frozen_linear_top1"],
                             "labelled": m["subset_size"], "epochs": m["chosen"]["epochs"],
                             "lr": m["chosen"]["lr"], "subset_sha256": m["subset_sha256"][:16],
                             "wall_s": round(wall, 1)})
                commands.append(command)
                print(json.dumps(semi[-1]), flush=True)

    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "python": platform.python_version()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "budget_min": None if args.steps else args.budget, "steps": args.steps,
              "pretrain_args": args.pretrain_args, "width": float(args.width), "rows": rows,
              "semi": semi,
              "saliency_s": round(saliency_s, 1),
              "analysis_figures": {k: str(wd / k / run_label)
                                   for k in ("neighbors", "ratios")},
              "commands": commands}
    out.write_text(json.dumps(result, indent=2) + "\n")
    length = f"{args.steps} steps" if args.steps else f"Budget {args.budget:g} min"
    lines = [f"{length} of training per method, ResNet-18 w{args.width} cifar stem, CIFAR-10"
             + (f", extra pretrain options: {args.pretrain_args}" if extra else "") + ".", "",
             "| method | steps | epochs | schedule done | train min | img/s | kNN top-1 | linear top-1 | "
             "linear top-5 | ratio median |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['ratio_median']:.3f}" if "ratio_median" in r else ""
        done = f"{100 * r['schedule_done']:.0f}%" if "schedule_done" in r else ""
        lines.append(f"| {r['method']} | {r['steps']} | {r['epochs']} | {done} | {r['train_min']} | "
                     f"{r.get('images_per_s', '')} | "
                     f"{100 * r['knn_top1']:.1f} | {100 * r['linear_top1']:.1f} | "
                     f"{100 * r['linear_top5']:.1f} | {ratio} |")
    if semi:
        lines += ["", "| labels | encoder | fine-tune top-1 | top-5 | frozen linear top-1 (same labels) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {100 * s['fraction']:g}% ({s['labelled']} images, {s['epochs']:g} epochs) | "
                  f"{s['encoder']} | {100 * s['top1']:.1f} | {100 * s['top5']:.1f} | "
                  f"{100 * s['frozen_linear_top1']:.1f} |"
                  for s in semi]
    print("\n".join(lines))
    lines += ["", "Commands:", ""] + [f"    {c}" for c in commands]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
