"""Plots (matplotlib, imported only when a plot is asked for)."""


def plot_curves(rows, path):
    """A training run's curves from its metrics rows: train and val loss, val top-1 (and top-5)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.6, label="train")
    a.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val")
    a.set_xlabel("step"), a.set_ylabel("loss"), a.legend()
    b.plot([r["step"] for r in val], [r["top1"] for r in val], "o-", label="val top-1")
    if val and val[0]["top5"] is not None:
        b.plot([r["step"] for r in val], [r["top5"] for r in val], "o-", label="val top-5")
    b.set_xlabel("step"), b.set_ylabel("accuracy"), b.set_ylim(0, 1), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
