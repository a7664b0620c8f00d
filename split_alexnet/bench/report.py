"""The bench's outputs: the printed table, bench.json and bench.png."""
import json
import os

from .plot import plot


def _mb(b):
    return f"{b / 2**20:,.1f}"


def format_table(rows, exchanges):
    """One line per run (layout and batch size), then one per exchange (the main batch)."""
    lines = [f"{'layout':<18}{'batch':>6}{'img/s':>8}{'[min-max]':>15}{'step s':>8}{'fwd':>7}{'bwd':>7}"
             f"{'comm':>7}{'(min)':>7}{'opt':>6}{'comm%':>7}{'CPU s':>7}{'util':>6}{'MB sent/step':>14}"
             f"{'spec MB':>9}{'peak MB':>9}"]
    for r in rows:
        b = r["breakdown"]
        span = f"[{r['images_per_s_min']:.2f}-{r['images_per_s_max']:.2f}]"
        lines.append(
            f"{r['label']:<18}{r['batch_size']:>6}{r['images_per_s']:>8.2f}{span:>15}"
            f"{r['step_s']:>8.3f}{b['fwd_compute_s']:>7.3f}{b['bwd_compute_s']:>7.3f}{r['comm_s']:>7.3f}"
            f"{r['comm_min_rank_s']:>7.3f}{b['optimizer_s']:>6.3f}{100 * r['comm_s'] / r['step_s']:>6.2f}%"
            f"{r['cpu_s_per_step']:>7.2f}{r['cpu_util']:>6.2f}"
            f"{_mb(r['bytes_sent_per_step']):>14}{_mb(r['spec_bytes_sent_per_step']):>9}"
            f"{_mb(r['peak_mem_bytes']):>9}")
    if exchanges:
        lines.append("")
        lines.append(f"{'exchange':<10}{'B/image spec':>13}{'counted':>10}{'bwd spec':>10}{'counted':>10}"
                     f"{'fwd s':>9}{'bwd s':>9}{'overlap fwd s':>15}{'overlap bwd s':>15}")
        for e in exchanges:
            def g(k, fmt):
                return format(e[k], fmt) if k in e else "-"
            lines.append(f"{e['name']:<10}{e['bytes_per_image']:>13,}{g('counted_bytes_per_image', ',.0f'):>10}"
                         f"{e['bwd_bytes_per_image']:>10,}{g('counted_bwd_bytes_per_image', ',.0f'):>10}"
                         f"{g('fwd_s', '.4f'):>9}{g('bwd_s', '.4f'):>9}{g('overlap_fwd_s', '.4f'):>15}"
                         f"{g('overlap_bwd_s', '.4f'):>15}")
    return "\n".join(lines)


def write_outputs(result, out_dir):
    """bench.json (the result dict) and bench.png in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(out_dir, "bench.png"))
