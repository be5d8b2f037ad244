"""The size/accuracy plot: perplexity against bits per weight, Pareto front marked."""

from __future__ import annotations

from pathlib import Path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both size and perplexity (lower is better)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def size_vs_ppl(rows: list[dict], dataset: str, path: Path, title: str) -> None:
    """Perplexity vs bits per weight (Pareto front marked), and beside it KL vs bits per weight:
    on small models perplexity moves within noise, KL shows the fidelity ordering."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), dpi=110)
    for ax, key, label, log in ((axes[0], f"ppl_{dataset}", f"perplexity ({dataset})", False),
                                (axes[1], f"kld_{dataset}", f"mean KL vs FP32 ({dataset}, nats, log)", True)):
        pts = [(r["bits_per_weight"], r[key]) for r in rows]
        if log:  # the FP32 row has KL 0: keep it visible at the floor of the axis
            floor = min((y for _, y in pts if y > 0), default=1e-6) / 3
            pts = [(x, max(y, floor)) for x, y in pts]
        front = pareto_front(pts)
        for r, (x, y) in zip(rows, pts):
            ax.scatter([x], [y], s=36, zorder=3)
            ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(5, 3), fontsize=7)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, zorder=2, label="Pareto front")
        ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], s=110, facecolors="none", edgecolors="k", zorder=4)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("bits per weight (all stored bytes / all parameters)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
