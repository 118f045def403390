"""Training curves as a PNG: easier to read than a column of per-epoch tables."""
import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # noqa: E402  (no display on cluster nodes)
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(history, path, title=""):
    """``history``: {"loss": [[step, value], ...], "dev": [[epoch, metrics], ...]} -> PNG at ``path``."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if history.get("loss"):
        steps, values = zip(*history["loss"])
        ax1.plot(steps, values, lw=1)
        if min(values) > 0:
            ax1.set_yscale("log")  # summed-violation warm-up losses are ~100x the hardest-negative ones
    ax1.set(xlabel="optimizer step", ylabel="loss per pair", title="training loss")
    ax1.grid(alpha=0.3)
    dev = history.get("dev") or []
    if dev:
        epochs = [e for e, _ in dev]
        for key, style in (("i2t_R1", "-"), ("i2t_R5", "--"), ("t2i_R1", "-"), ("t2i_R5", "--")):
            ax2.plot(epochs, [m[key] for _, m in dev], style, marker="o", ms=3, label=key.replace("_", " "))
        ax2.set(xlabel="epoch", ylabel="recall (%)", title="dev recall (rsum on the right axis)")
        ax3 = ax2.twinx()
        ax3.plot(epochs, [m["rsum"] for _, m in dev], color="k", lw=2, label="rsum")
        ax3.set_ylabel("rsum")
        ax2.legend(loc="lower right", fontsize=8)
    ax2.grid(alpha=0.3)
    return _save(fig, path, title)


def recall_at_k(named_metrics, path, title=""):
    """Recall at K = 1, 5, 10 for image->text and text->image, one line per evaluation.

    ``named_metrics``: {"test": metrics, "dev (best)": metrics, ...} with the i2t_R*/t2i_R* keys."""
    ks = (1, 5, 10)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, direction, name in ((axes[0], "i2t", "image -> text"), (axes[1], "t2i", "text -> image")):
        for label, m in named_metrics.items():
            if m is None or not all(f"{direction}_R{k}" in m for k in ks):
                continue
            values = [m[f"{direction}_R{k}"] for k in ks]
            ax.plot(ks, values, marker="o", label=label)
            for k, v in zip(ks, values):
                ax.annotate(f"{v:.1f}", (k, v), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
        ax.set(xlabel="K", title=f"{name} R@K", xticks=ks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("recall (%)")
    return _save(fig, path, title)


def compare_runs(rows, histories, path, metric="rsum", title="run comparison"):
    """Left: ``metric`` per run as bars (best first); right: dev rsum over epochs per run.

    ``rows``: [{"label", metric}] in display order; ``histories``: {label: [(epoch, dev rsum), ...]}."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = [r["label"] for r in rows]
    values = [r.get(metric) if r.get(metric) is not None else 0.0 for r in rows]
    colors = [f"C{i % 10}" for i in range(len(rows))]
    bars = ax1.bar(range(len(rows)), values, color=colors)
    for b, r in zip(bars, rows):
        if r.get(metric) is not None:
            ax1.annotate(f"{r[metric]:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), textcoords="offset points",
                         xytext=(0, 3), ha="center", fontsize=8)
    ax1.set_xticks(range(len(rows)))
    ax1.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax1.set(ylabel=metric, title=f"{metric} per run")
    ax1.grid(axis="y", alpha=0.3)
    for color, label in zip(colors, labels):
        h = histories.get(label) or []
        if h:
            epochs, v = zip(*h)
            ax2.plot(epochs, v, marker="o", ms=3, color=color, label=label)
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.set(xlabel="epoch", ylabel="dev rsum", title="dev rsum over epochs")
    ax2.grid(alpha=0.3)
    if any(histories.get(label) for label in labels):
        ax2.legend(fontsize=7)
    return _save(fig, path, title)


def _save(fig, path, title=""):
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
