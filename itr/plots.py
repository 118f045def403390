"""Training curves as a PNG: easier to read than a column of per-epoch tables."""
import matplotlib

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
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
