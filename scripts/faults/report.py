"""The reliability report: one Markdown table row per scenario and a PNG timeline each."""

from __future__ import annotations

from pathlib import Path

COLUMNS = ("scenario", "sent", "acked", "replied", "dlq", "lost", "duplicates", "late", "recovery_s",
           "p99_during_fault_ms", "notes")


def markdown(rows: list[dict], title: str = "Flock fault-injection report") -> str:
    lines = [f"# {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in COLUMNS) + " |")
    lines += ["", "lost must be 0: every request Kafka acknowledged got a reply or a DLQ record. "
              "recovery_s: the longest silence in replies after the fault began. "
              "late: ok replies that arrived after the request's deadline."]
    return "\n".join(lines) + "\n"


def plot(name: str, timeline: dict, faults: list[tuple[str, float, float]], t0: float, out: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(timeline["t"], timeline["sent"], label="sent/s", lw=1)
    ax.plot(timeline["t"], timeline["replied"], label="replied/s", lw=1.5)
    for fname, start, end in faults:
        ax.axvspan(start - t0, max(end - t0, start - t0 + 0.3), color="red", alpha=0.15)
        ax.text(start - t0, ax.get_ylim()[1] * 0.9, fname, fontsize=7, color="red")
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests")
    ax.set_title(name)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
