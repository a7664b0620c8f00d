"""The figures and tables of docs/training.md from the runs of scripts/recipe_experiments.sh.

  python scripts/plot_recipe.py [--runs runs/recipe] [--out docs/init-curves.png]

Prints (markdown) the training loss of each init at a few steps (the mean of the 10 steps ending there, so
one batch's noise does not decide a row), the validation top-1 at each evaluation, and the half-width
comparison's final top-1 and top-5 errors; draws the loss curves of the init runs.
"""
import argparse
import json
import os

INITS = ("paper", "caffe", "kaiming")
SETS = ("mnist", "shapes")
STEPS = (1, 10, 25, 50, 100, 150, 200, 300, 400, 500)
LONG = {("shapes", "caffe"): "init-shapes-caffe-500", ("mnist", "caffe"): "half-mnist-paper"}  # longer runs


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def load(runs, name):
    path = os.path.join(runs, name, "metrics.jsonl")
    return rows(path) if os.path.exists(path) else None


def loss_at(train, step, window=10):
    got = [r["loss"] for r in train if step - window < r["step"] <= step]
    return sum(got) / len(got) if got else None


def init_tables(runs):
    out = []
    for ds in SETS:
        out.append(f"\n{ds}: training loss (mean of the 10 steps ending at the step; chance: ln 10 = 2.303)\n")
        out.append("| init | " + " | ".join(f"step {s}" for s in STEPS) + " | val top-1 (at step) |")
        out.append("|---|" + "---|" * (len(STEPS) + 1))
        for init, name in [(i, f"init-{ds}-{i}") for i in INITS] + [(f"{i} (longer run: {n})", n)
                                                                    for (d, i), n in LONG.items() if d == ds]:
            m = load(runs, name)
            if m is None:
                continue
            train = [r for r in m if r["split"] == "train"]
            val = [r for r in m if r["split"] == "val"]
            cells, nan = [], next((r["step"] for r in train if r["loss"] != r["loss"]), None)
            for s in STEPS:
                v = loss_at(train, s, 1 if s == 1 else 10)
                if nan is not None and s >= nan:
                    v = f"NaN from step {nan}" if s - nan < 10 else None
                cells.append("-" if v is None else v if isinstance(v, str) else f"{v:.3f}")
            vals = " / ".join(f"{r['top1']:.3f} ({r['step']})" for r in val)
            out.append(f"| {init} | " + " | ".join(cells) + f" | {vals} |")
    return "\n".join(out)


def half_table(runs):
    out = ["\nhalf-width comparison (final validation, ten-crop): error = 1 - accuracy\n",
           "| data | net | params | val top-1 error | val top-5 error | val loss | steps |", "|---|---|---|---|---|---|---|"]
    for ds, prefix in (("mnist", "half"), ("mnist", "halffast"), ("shapes", "half")):
        for net in ("paper", "half"):
            m = load(runs, f"{prefix}-{ds}-{net}")
            if m is None:
                continue
            val = [r for r in m if r["split"] == "val"]
            if not val:
                continue
            cfg = json.load(open(os.path.join(runs, f"{prefix}-{ds}-{net}", "config.json")))
            from split_alexnet.spec import Spec
            params = Spec(**cfg["spec"]).params_total
            last = val[-1]
            top5 = "-" if last["top5"] is None else f"{100 * (1 - last['top5']):.1f} %"
            out.append(f"| {ds} ({prefix}: {cfg['recipe']}, {cfg['preprocess']} input) | {net} | {params:,} | {100 * (1 - last['top1']):.1f} % | {top5} | "
                       f"{last['loss']:.4f} | {last['step']} |")
            out.append("|  |  | top-1 at each evaluation | " + ", ".join(f"{r['top1']:.3f}" for r in val) + " | | | |")
    return "\n".join(out)


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    colours = dict(paper="tab:red", caffe="tab:orange", kaiming="tab:blue")
    for ax, ds in zip(axes, SETS):
        for init in INITS:
            m = load(runs, f"init-{ds}-{init}")
            if m is None:
                continue
            train = [r for r in m if r["split"] == "train"]
            steps = [r["step"] for r in train]
            smooth = [loss_at(train, s, 10) for s in steps]
            ax.plot(steps, [r["loss"] for r in train], color=colours[init], alpha=0.2, lw=0.8)
            ax.plot(steps, smooth, color=colours[init], lw=1.6, label=f"--init {init}")
            nan = next((r["step"] for r in train if r["loss"] != r["loss"]), None)
            if nan is not None:                    # off the chart: say where it went
                ax.text(5, 3.6, f"--init {init}: loss {train[0]['loss']:.0f} at step 1, NaN at step {nan}",
                        color=colours[init], fontsize=8)
        long = load(runs, LONG.get((ds, "caffe"), ""))
        if long:
            train = [r for r in long if r["split"] == "train"]
            steps = [r["step"] for r in train]
            ax.plot(steps, [loss_at(train, s, 10) for s in steps], color=colours["caffe"], lw=1.2, ls="--",
                    label="--init caffe, longer run")
        ax.axhline(2.3026, color="grey", ls=":", lw=1)
        ax.set_title(f"{ds}, --recipe paper (0-255 minus mean image), 67 px, batch 64")
        ax.set_xlabel("SGD step")
        ax.set_ylim(0, 4)
        ax.title.set_fontsize(8)
    axes[0].set_ylabel("training loss (10-step mean)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/recipe")
    p.add_argument("--out", default="docs/init-curves.png")
    args = p.parse_args()
    print(init_tables(args.runs))
    print(half_table(args.runs))
    if any(load(args.runs, f"init-{d}-{i}") for d in SETS for i in INITS):
        print(f"\nwrote {plot(args.runs, args.out)}")


if __name__ == "__main__":
    main()
