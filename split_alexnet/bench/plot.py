"""bench.png: seconds per step by phase per layout; with a sweep, images/s and peak memory against batch.

Read honestly: every y axis starts at zero; the error bars span the recorded min and max over the
measured steps (images/s min/max, and the step time they imply); one colour per layout in every panel;
the figure's title says what ran (device, cores, ranks, threads, allocator, size, precision, steps) and
each panel's title says which batch its numbers are for.
"""

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
PHASES = (("fwd compute", lambda r: r["breakdown"]["fwd_compute_s"], 1.0, ""),
          ("bwd compute", lambda r: r["breakdown"]["bwd_compute_s"], 0.65, "//"),
          ("communication (exposed)", lambda r: r["comm_s"], 0.4, "xx"),
          ("optimizer", lambda r: r["breakdown"]["optimizer_s"], 0.2, ".."))


def layout_colours(result):
    """{label: colour}, in the order the labels first appear: the same colour in every panel."""
    labels = dict.fromkeys(r["label"] for r in result["runs"])
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


def describe(result):
    """The run in one line: what a reader needs to compare this figure with another."""
    alloc = result.get("allocator") or "allocator not recorded"
    if isinstance(alloc, dict):
        alloc = alloc.get("name") or alloc.get("reason") or str(alloc)
    return (f"{result['device']}; {result['world']} rank(s) ({result['backend']}), "
            f"{result['threads_per_rank']} thread(s) per rank; {alloc}; {result['image_size']} px, "
            f"{result.get('precision', result.get('dtype'))}; {result['warmup']} warm-up + {result['steps']} "
            f"measured steps per layout; {result.get('date', '')}")


def wrap_title(text, width_in, fontsize=9):
    """`text` broken at its "; " into lines that fit a figure `width_in` inches wide (a character of the
    default sans-serif font is at most about 0.6 x fontsize points wide), so the title is never clipped."""
    per_line = max(20, int(width_in * 72 / (0.6 * fontsize)))
    lines = [""]
    for part in text.split("; "):
        if lines[-1] and len(lines[-1]) + 2 + len(part) > per_line:
            lines.append(part)
        else:
            lines[-1] = f"{lines[-1]}; {part}" if lines[-1] else part
    return "\n".join(lines)


def step_range(r):
    """(fastest, slowest) step seconds, from the recorded images/s max and min."""
    b = r["batch_size"]
    return b / r["images_per_s_max"], b / r["images_per_s_min"]


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    colours = layout_colours(result)
    main = [r for r in result["runs"] if r["batch_size"] == result["batch_size"]]
    sweep = sorted({r["batch_size"] for r in result["runs"]})
    ncols = 3 if len(sweep) > 1 else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.2 * ncols, 5.2), squeeze=False)
    ax = axes[0][0]
    labels = [r["label"] for r in main]
    xs = range(len(main))
    bottom = [0.0] * len(main)
    for _name, get, alpha, hatch in PHASES:
        vals = [get(r) for r in main]
        ax.bar(xs, vals, bottom=bottom, color=[colours[l] for l in labels], alpha=alpha, hatch=hatch,
               edgecolor=[colours[l] for l in labels], linewidth=0.8)
        bottom = [b + v for b, v in zip(bottom, vals)]
    lo_hi = [step_range(r) for r in main]
    med = [r["step_s"] for r in main]
    ax.errorbar(xs, med, yerr=[[max(0.0, m - lo) for m, (lo, _) in zip(med, lo_hi)],
                               [max(0.0, hi - m) for m, (_, hi) in zip(med, lo_hi)]],
                fmt="_", color="black", capsize=4, label="step time: median, min–max")
    ax.set_xticks(list(xs), labels, rotation=20)
    for tick, label in zip(ax.get_xticklabels(), labels):
        tick.set_color(colours[label])
    ax.set_ylim(0, 1.55 * max(max(hi, m) for (_, hi), m in zip(lo_hi, med)))   # room above for the legend
    ax.set_ylabel("seconds per step (median phases)")
    ax.set_title(f"batch {result['batch_size']}: seconds per step by phase", fontsize=10)
    handles = [Patch(facecolor="#888888", alpha=a, hatch=h, label=n) for n, _, a, h in PHASES]
    handles.append(ax.get_legend_handles_labels()[0][0])
    ax.legend(handles=handles, fontsize=8, loc="upper left", ncol=2)
    if ncols > 1:
        for ax, key, ylabel in ((axes[0][1], "images_per_s", "images/s (median, min–max)"),
                                (axes[0][2], "peak_mem_bytes", "peak memory per device (MiB)")):
            for label in colours:
                pts = sorted((r["batch_size"], r) for r in result["runs"] if r["label"] == label)
                bs = [b for b, _ in pts]
                if key == "images_per_s":
                    ys = [r[key] for _, r in pts]
                    err = [[max(0.0, y - r["images_per_s_min"]) for y, (_, r) in zip(ys, pts)],
                           [max(0.0, r["images_per_s_max"] - y) for y, (_, r) in zip(ys, pts)]]
                    ax.errorbar(bs, ys, yerr=err, marker="o", capsize=3, color=colours[label], label=label)
                else:
                    ax.plot(bs, [r[key] / 2**20 for _, r in pts], marker="o", color=colours[label], label=label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sweep, [str(b) for b in sweep])
            ax.set_xlabel("batch size (every batch of the sweep)")
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.set_title(f"{ylabel.split(' (')[0]} against batch {', '.join(map(str, sweep))}", fontsize=10)
            ax.legend(fontsize=8)
    title = wrap_title(describe(result), fig.get_figwidth(), fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.035 * (title.count("\n") + 1)))   # room for the title's lines
    fig.savefig(path, dpi=110)
    plt.close(fig)
