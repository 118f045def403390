"""Training curves as a PNG: easier to read than a column of per-epoch tables."""
import matplotlib
import matplotlib.patches
import matplotlib.ticker

matplotlib.use("Agg")  # noqa: E402  (no display on cluster nodes)
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(history, path, title="", warmup_epochs=0, warmup_step=None):
    """``history``: {"loss": [[step, value], ...], "dev": [[epoch, metrics], ...]} -> PNG at ``path``.

    The warm-up (``warmup_epochs`` of summed violations, up to optimizer step ``warmup_step``) is shaded and its
    loss drawn apart: it is ~100x the hardest-negative loss that follows, which is no collapse."""
    return _save(curves_figure(history, warmup_epochs, warmup_step), path, title)


def curves_figure(history, warmup_epochs=0, warmup_step=None):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    _loss_panel(ax1, history.get("loss") or [], warmup_step)
    dev = history.get("dev") or []
    if dev:
        epochs = [e for e, _ in dev]
        if warmup_epochs:
            ax2.axvspan(min(epochs) - 0.5, warmup_epochs + 0.5, color="0.9", zorder=0)
        for key, style, color in (("i2t_R1", "-", "C0"), ("i2t_R5", "--", "C0"), ("t2i_R1", "-", "C1"),
                                  ("t2i_R5", "--", "C1")):
            ax2.plot(epochs, [m[key] for _, m in dev], style, color=color, marker="o", ms=3,
                     label=key.replace("_", " R@").replace("R@R", "R@"))
        ax3 = ax2.twinx()
        ax3.plot(epochs, [m["rsum"] for _, m in dev], color="k", lw=2, marker="s", ms=3, label="rsum (right axis)")
        ax3.set_ylabel("rsum")
        handles = ax2.get_legend_handles_labels()[0] + ax3.get_legend_handles_labels()[0]
        if warmup_epochs:
            handles.append(matplotlib.patches.Patch(color="0.9", label=f"warm-up ({warmup_epochs} ep.)"))
        ax2.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.12, 1.0), borderaxespad=0)
        ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.set(xlabel="epoch", ylabel="recall (%)", title="dev recall and rsum")
    ax2.grid(alpha=0.3)
    return fig


def _loss_panel(ax, loss, warmup_step):
    """The loss per optimizer step; log scale (ticks 1-2-5, plain numbers) when it spans over a decade."""
    if loss:
        steps, values = zip(*loss)
        warm = [(x, v) for x, v in loss if warmup_step is not None and x <= warmup_step]
        rest = [(x, v) for x, v in loss if warmup_step is None or x > warmup_step]
        if warm:
            ax.axvspan(min(steps), warmup_step, color="0.9", zorder=0)
            ax.plot(*zip(*warm), lw=1, color="C3", label="warm-up: summed violations")
        if rest:
            ax.plot(*zip(*rest), lw=1, color="C0", label="hardest negative" if warm else "loss")
        if min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if warm:
            ax.legend(fontsize=8, loc="upper right")
    ax.set(xlabel="optimizer step", ylabel="loss per pair", title="training loss")
    ax.grid(alpha=0.3, which="major")


def recall_at_k(named_metrics, path, title=""):
    """Recall at K = 1, 5, 10 for image->text and text->image, one line per evaluation (its rsum in the legend),
    the values written beside the points and pushed apart where lines meet.

    ``named_metrics``: {"test": metrics, "dev (best)": metrics, ...} with the i2t_R*/t2i_R* keys."""
    fig, legend = recall_figure(named_metrics)
    return _save(fig, path, title, rect=(0, 0.07 if legend else 0, 1, 1))


def recall_figure(named_metrics):
    """(figure, whether it has a legend) of ``recall_at_k``."""
    ks = (1, 5, 10)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    series = [(label, m) for label, m in named_metrics.items()
              if m is not None and all(f"{d}_R{k}" in m for d in ("i2t", "t2i") for k in ks)]
    for ax, direction, name in ((axes[0], "i2t", "image -> text"), (axes[1], "t2i", "text -> image")):
        for i, (label, m) in enumerate(series):
            rsum = f" (rsum {m['rsum']:.1f})" if "rsum" in m else ""
            ax.plot(ks, [m[f"{direction}_R{k}"] for k in ks], marker="o", color=f"C{i}", ls=("-", "--", ":")[i % 3],
                    label=f"{label}{rsum}")
        ax.set(xlabel="K", title=f"{name} R@K", xticks=ks, xlim=(0, 12.5))
        ax.grid(alpha=0.3)
    lo, hi = axes[0].get_ylim()
    pad = 0.08 * (hi - lo)
    axes[0].set_ylim(lo - pad * max(len(series) - 1, 0), hi + pad)  # room for labels pushed apart
    for ax, direction in ((axes[0], "i2t"), (axes[1], "t2i")):
        _value_labels(ax, [(f"C{i}", [m[f"{direction}_R{k}"] for k in ks]) for i, (_, m) in enumerate(series)], ks)
    axes[0].set_ylabel("recall (%)")
    if series:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(series), 3), fontsize=8, frameon=False)
    return fig, bool(series)


def _value_labels(ax, series, ks):
    """Each point's value to its right; at one K, labels closer than a line height are pushed apart."""
    lo, hi = ax.get_ylim()
    gap = 0.065 * (hi - lo)
    for j, k in enumerate(ks):
        placed = []
        for color, v in sorted(((c, vals[j]) for c, vals in series), key=lambda x: -x[1]):
            y = v if not placed else min(v, placed[-1] - gap)
            placed.append(y)
            ax.annotate(f"{v:.1f}", (k, v), xytext=(k + 0.35, y), textcoords="data", va="center", ha="left",
                        fontsize=7, color=color)


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


def _save(fig, path, title="", rect=(0, 0, 1, 1)):
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
