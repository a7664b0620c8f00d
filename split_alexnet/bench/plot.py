"""bench.png: seconds per step by phase per layout; with a sweep, images/s and peak memory against batch."""


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    main = [r for r in result["runs"] if r["batch_size"] == result["batch_size"]]
    sweep = sorted({r["batch_size"] for r in result["runs"]})
    ncols = 3 if len(sweep) > 1 else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5), squeeze=False)
    ax = axes[0][0]
    parts = [("fwd compute", lambda r: r["breakdown"]["fwd_compute_s"]),
             ("bwd compute", lambda r: r["breakdown"]["bwd_compute_s"]),
             ("communication (exposed)", lambda r: r["comm_s"]),
             ("optimizer", lambda r: r["breakdown"]["optimizer_s"])]
    labels = [r["label"] for r in main]
    bottom = [0.0] * len(main)
    for name, get in parts:
        vals = [get(r) for r in main]
        ax.bar(labels, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("seconds per step (median)")
    ax.set_title(f"batch {result['batch_size']}, {result['image_size']} px, {result['dtype']}, "
                 f"{result['device']}")
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize=8)
    if ncols > 1:
        for ax, key, ylabel in ((axes[0][1], "images_per_s", "images/s (median)"),
                                (axes[0][2], "peak_mem_bytes", "peak memory per device (MiB)")):
            for label in dict.fromkeys(r["label"] for r in result["runs"]):
                pts = sorted((r["batch_size"], r[key]) for r in result["runs"] if r["label"] == label)
                ys = [v / 2**20 if key == "peak_mem_bytes" else v for _, v in pts]
                ax.plot([b for b, _ in pts], ys, marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
