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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["bits_per_weight"], r[f"ppl_{dataset}"]) for r in rows]
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for r, (x, y) in zip(rows, pts):
        ax.scatter([x], [y], s=40, zorder=3)
        ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, zorder=2, label="Pareto front")
    ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], s=120, facecolors="none", edgecolors="k", zorder=4)
    ax.set_xlabel("bits per weight (all stored bytes / all parameters)")
    ax.set_ylabel(f"perplexity ({dataset})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
