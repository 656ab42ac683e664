"""Turning rows into what people read: the terminal table, JSON, Markdown, the PNG
plot, the comparison against an earlier run, the DESIGN section 6 bars, and
``stfast/dispatch.json`` (the measured backend order ``auto`` dispatch reads)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

# What "hand-written SDPA code on the same problem" is, per problem class.
HAND_WRITTEN = {"dense": "sdpa", "causal": "sdpa", "space": "permute+sdpa", "time": "permute+sdpa"}
DISPATCH_FILE = Path(__file__).resolve().parent.parent / "stfast" / "dispatch.json"


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _note(r: dict) -> str:
    if r["status"] == "ok":
        if r.get("bytes_per_layer") is not None:  # distributed rows: communication volume
            return f"{r['bytes_per_layer']:,} B/layer ({r['activation_shares']:.1f}x M/P)"
        return f"compile {r['compile_s']:.1f}s" if r.get("compile_s") is not None else ""
    return f"{r['status'].upper()}: {r['reason']}"


COLUMNS = ("case", "pass", "impl", "ms", "TFLOP/s", "% peak", "peak MB", "speed-up", "note")


def _cells(r: dict) -> list[str]:
    return [r["case"], r["pass"], r["impl"], _fmt(r.get("ms"), ".3f"), _fmt(r.get("tflops"), ".3g"),
            _fmt(r["frac_peak"] * 100 if r.get("frac_peak") else None, ".0f"),
            _fmt(r.get("peak_mb"), ".1f"), _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""),
            _note(r)]


def _shown(rows):
    return [r for r in rows if r["status"] != "skipped"]


def skipped_summary(rows) -> list[tuple[str, str, int]]:
    """``(impl, reason, how many rows)`` for every skipped implementation."""
    counts: dict = defaultdict(int)
    for r in rows:
        if r["status"] == "skipped":
            counts[(r["impl"], r["reason"])] += 1
    return [(impl, reason, n) for (impl, reason), n in counts.items()]


def text_table(rows) -> str:
    body = [_cells(r) for r in _shown(rows)]
    widths = [max([len(c)] + [len(row[i]) for row in body]) for i, c in enumerate(COLUMNS)]
    widths[-1] = len(COLUMNS[-1])  # the note runs on unpadded
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    previous = None
    for r, cells in zip(_shown(rows), body):
        key = (r["suite"], r["case"], r["pass"])
        if previous is not None and key != previous:
            lines.append("")
        previous = key
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    skipped = skipped_summary(rows)
    if skipped:
        lines += ["", "skipped:"] + [f"  {impl}: {reason} ({n} rows)" for impl, reason, n in skipped]
    return "\n".join(lines)


def bars(rows) -> dict:
    """The DESIGN section 6 CPU bars, measured (never asserted).

    ``hand_written``: stfast[torch] time / hand-written SDPA time on the same problem
    (bar: <= 1.1).  ``block_sparse``: dense masked SDPA time / stfast[torch] time
    (bar: >= 3 at ~10% density) and stfast[torch] peak / masked SDPA peak (bar <= 0.25).
    """
    by_key = {(r["suite"], r["case"], r["pass"], r["impl"]): r for r in rows if r["status"] == "ok"}
    hand, sparse = [], []
    for (suite, case, pass_, impl), r in by_key.items():
        if impl != "stfast[torch]":
            continue
        if r["problem_class"] in HAND_WRITTEN:
            base = by_key.get((suite, case, pass_, HAND_WRITTEN[r["problem_class"]]))
            if base:
                hand.append(dict(case=case, pass_=pass_, baseline=base["impl"],
                                 ratio=r["ms"] / base["ms"]))
        elif r["problem_class"] == "block_sparse":
            base = by_key.get((suite, case, pass_, "sdpa+mask"))
            if base:
                sparse.append(dict(case=case, pass_=pass_, density=r["density"],
                                   speedup=base["ms"] / r["ms"],
                                   memory=r["peak_mb"] / base["peak_mb"] if base["peak_mb"] else None))
    return {"hand_written": hand, "block_sparse": sparse}


def bars_markdown(b: dict) -> str:
    lines = ["### DESIGN section 6 CPU bars (measured, not asserted)", "",
             "stfast[torch] time / hand-written SDPA time on the same problem (bar: <= 1.10):", "",
             "| case | pass | baseline | ratio |", "|---|---|---|---|"]
    lines += [f"| {h['case']} | {h['pass_']} | {h['baseline']} | {h['ratio']:.2f} |" for h in b["hand_written"]]
    lines += ["", "Block-sparse: dense masked SDPA time / stfast[torch] time (bar: >= 3 at 10% density) "
              "and stfast[torch] peak memory / masked SDPA peak memory (bar: <= 0.25):", "",
              "| case | pass | density | speed-up | memory ratio |", "|---|---|---|---|---|"]
    lines += [f"| {s['case']} | {s['pass_']} | {s['density']:.3f} | {s['speedup']:.2f}x | "
              f"{_fmt(s['memory'], '.3f')} |" for s in b["block_sparse"]]
    return "\n".join(lines)


def compare(rows, old_rows, threshold: float) -> dict:
    """Rows timed in both runs, and those slower (faster) by more than ``threshold``."""
    def key(r):
        return (r["suite"], r["case"], r["pass"], r["impl"], r["dtype"], r["device"])
    old = {key(r): r for r in old_rows if r["status"] == "ok"}
    regressions, improvements, matched = [], [], 0
    for r in rows:
        before = old.get(key(r))
        if r["status"] != "ok" or before is None:
            continue
        matched += 1
        entry = dict(case=r["case"], pass_=r["pass"], impl=r["impl"], old_ms=before["ms"],
                     new_ms=r["ms"], ratio=r["ms"] / before["ms"])
        if entry["ratio"] > 1 + threshold:
            regressions.append(entry)
        elif entry["ratio"] < 1 / (1 + threshold):
            improvements.append(entry)
    newly_broken = [dict(case=r["case"], pass_=r["pass"], impl=r["impl"], status=r["status"])
                    for r in rows if r["status"] in ("error", "wrong") and key(r) in old]
    return dict(threshold=threshold, matched=matched, regressions=regressions,
                improvements=improvements, newly_broken=newly_broken)


def compare_text(c: dict, markdown: bool = False) -> str:
    head = (f"Comparison with the earlier run: {c['matched']} rows timed in both, "
            f"{len(c['regressions'])} slower and {len(c['improvements'])} faster by more than "
            f"{c['threshold']:.0%}, {len(c['newly_broken'])} newly failing.")
    lines = [head]
    for title, entries in (("REGRESSION", c["regressions"]), ("improvement", c["improvements"])):
        for e in entries:
            lines.append(f"{'- ' if markdown else '  '}{title}: {e['case']} {e['pass_']} {e['impl']}: "
                         f"{e['old_ms']:.3f} -> {e['new_ms']:.3f} ms ({e['ratio']:.2f}x)")
    for e in c["newly_broken"]:
        lines.append(f"{'- ' if markdown else '  '}NOW {e['status'].upper()}: {e['case']} {e['pass_']} {e['impl']}")
    return "\n".join(lines)


def markdown(meta: dict, rows, comparison: dict | None) -> str:
    lines = [f"# stfast benchmark: {meta['device']}", "",
             f"{meta['when']}, torch {meta['torch']}, stfast {meta['stfast']}, dtype {meta['dtype']}, "
             f"preset `{meta['preset']}`, passes {', '.join(meta['passes'])}, "
             f"{meta['threads']} CPU threads, commit {meta['commit']}, load average "
             f"{meta['load_average'][0]:.1f} before / {meta['load_average'][3]:.1f} after "
             "(other work on the machine makes CPU times noisy).", "",
             f"Command: `{meta['command']}`", "",
             "Time: median ms; TFLOP/s count visible (query, key) pairs only; peak MB: memory "
             "held beyond the inputs (see bench/README.md); speed-up: best competitor's time / "
             "this time (1.00x is the best competitor).", ""]
    for suite in dict.fromkeys(r["suite"] for r in rows):
        shown = [r for r in _shown(rows) if r["suite"] == suite]
        lines += [f"## {suite}", ""]
        if not shown:
            lines += ["(nothing ran)", ""]
            continue
        for case in dict.fromkeys(r["case"] for r in shown):
            first = next(r for r in shown if r["case"] == case)
            density = f", density {first['density']:.3f}" if first.get("density") is not None else ""
            lines += [f"**{case}** ({first['shape']}{density})", "",
                      "| " + " | ".join(COLUMNS[1:]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]
            lines += ["| " + " | ".join(_cells(r)[1:]) + " |" for r in shown if r["case"] == case]
            lines.append("")
    skipped = skipped_summary(rows)
    if skipped:
        lines += ["## skipped", ""] + [f"- {impl}: {reason} ({n} rows)" for impl, reason, n in skipped] + [""]
    lines += [bars_markdown(bars(rows)), ""]
    if comparison is not None:
        lines += ["## comparison", "", compare_text(comparison, markdown=True), ""]
    return "\n".join(lines)


def plot(rows, path: Path) -> str | None:
    """Speed-up of every timed implementation vs the best competitor, one panel per
    pass.  Returns why no plot was written, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no PNG written"
    timed = [r for r in rows if r["status"] == "ok" and r.get("speedup")]
    if not timed:
        return "no timed rows: no PNG written"
    passes = list(dict.fromkeys(r["pass"] for r in timed))
    cases = list(dict.fromkeys(f"{r['suite']}/{r['case']}" for r in timed))
    impls = sorted(dict.fromkeys(r["impl"] for r in timed), key=lambda n: (not n.startswith("stfast"), n))
    colors = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(impls)}
    height = 0.8 / len(impls)
    fig, axes = plt.subplots(1, len(passes), figsize=(7 * len(passes), 1.2 + 0.22 * len(cases) * len(impls) ** 0.5 * 2),
                             squeeze=False, sharey=True)
    for ax, pass_ in zip(axes[0], passes):
        for j, name in enumerate(impls):
            points = [(cases.index(f"{r['suite']}/{r['case']}"), r["speedup"]) for r in timed
                      if r["pass"] == pass_ and r["impl"] == name]
            if points:
                ys, xs = zip(*points)
                ax.barh([y + (j - len(impls) / 2) * height for y in ys], xs, height=height,
                        color=colors[name], label=name)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{pass_}: speed-up vs best competitor (higher is better)")
        ax.set_yticks(range(len(cases)))
        ax.set_yticklabels(cases, fontsize=7)
        ax.invert_yaxis()
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def dispatch_order(rows) -> dict[str, list[str]]:
    """Per problem class, the stfast backends that ran it, fastest first: ordered by
    the geometric mean over cases and passes of time / best stfast time."""
    best: dict = {}
    for r in rows:
        if r["status"] == "ok" and r["family"] == "stfast":
            key = (r["suite"], r["case"], r["pass"])
            best[key] = min(best.get(key, math.inf), r["ms"])
    logs: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["status"] == "ok" and r["family"] == "stfast":
            logs[r["problem_class"]][r["backend"]].append(
                math.log(r["ms"] / best[(r["suite"], r["case"], r["pass"])]))
    return {pclass: sorted(per, key=lambda b: sum(per[b]) / len(per[b])) for pclass, per in logs.items()}


def update_dispatch(rows, device: str, path: Path = DISPATCH_FILE) -> dict:
    """Merge this run's order for ``device`` into ``stfast/dispatch.json``."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    table.setdefault(device, {}).update(dispatch_order(rows))
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    return table
