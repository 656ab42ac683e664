"""Turning rows into what people read: the terminal table, JSON, Markdown, the PNG
plot, the comparison against an earlier run, the CPU targets of the torch backend, the
run's conditions (threads, load), and ``stfast/dispatch.json`` (the measured backend
order ``auto`` dispatch reads)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from .measure import clock

# What "hand-written SDPA code on the same problem" is, per problem class.
HAND_WRITTEN = {"dense": "sdpa", "causal": "sdpa", "space": "permute+sdpa", "time": "permute+sdpa"}
# The torch backend's targets: within this factor of hand-written SDPA code; block-sparse
# at ~10% density this much faster than dense masked SDPA, within this share of its memory.
HAND_WRITTEN_MAX_RATIO = 1.10
SPARSE_MIN_SPEEDUP = 3.0
SPARSE_MAX_MEMORY = 0.25
# Other processes' load, per core, above which CPU times are not to be trusted.
LOADED_PER_CORE = 0.5
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


def targets(rows) -> dict:
    """The torch backend's CPU targets, measured (never asserted).

    ``hand_written``: stfast[torch] time / hand-written SDPA time on the same problem
    (target: at most 1.10).  ``block_sparse``: dense masked SDPA time / stfast[torch] time
    (target: at least 3 at ~10% density) and stfast[torch] peak / masked SDPA peak
    (target: at most 0.25).
    """
    by_key = {(r["suite"], r["case"], r["pass"], r["impl"]): r for r in rows if r["status"] == "ok"}
    hand, sparse = [], []
    for (suite, case, pass_, impl), r in by_key.items():
        if impl != "stfast[torch]":
            continue
        if r["problem_class"] in HAND_WRITTEN:
            base = by_key.get((suite, case, pass_, HAND_WRITTEN[r["problem_class"]]))
            if base:
                ratio = r["ms"] / base["ms"]
                hand.append(dict(case=case, pass_=pass_, baseline=base["impl"], ratio=ratio,
                                 met=ratio <= HAND_WRITTEN_MAX_RATIO))
        elif r["problem_class"] == "block_sparse":
            base = by_key.get((suite, case, pass_, "sdpa+mask"))
            if base:
                speedup = base["ms"] / r["ms"]
                memory = r["peak_mb"] / base["peak_mb"] if base["peak_mb"] else None
                sparse.append(dict(case=case, pass_=pass_, density=r["density"], speedup=speedup,
                                   memory=memory, met=speedup >= SPARSE_MIN_SPEEDUP
                                   and memory is not None and memory <= SPARSE_MAX_MEMORY))
    return {"hand_written": hand, "block_sparse": sparse}


def _yes(met: bool) -> str:
    return "yes" if met else "NO"


def targets_markdown(t: dict) -> str:
    lines = ["### Targets of the torch backend (measured in this run, not asserted)", "",
             f"1. No slower than the SDPA code people write by hand for the same problem: "
             f"stfast[torch] time / the hand-written code's time at most {HAND_WRITTEN_MAX_RATIO:.2f} "
             "(`sdpa` for dense and causal; `permute+sdpa`, the TimeSformer / Open-Sora pipeline, "
             "for the space and time axes).", "",
             f"| case | pass | hand-written | stfast / hand-written | at most {HAND_WRITTEN_MAX_RATIO:.2f} |",
             "|---|---|---|---|---|"]
    lines += [f"| {h['case']} | {h['pass_']} | {h['baseline']} | {h['ratio']:.2f} | {_yes(h['met'])} |"
              for h in t["hand_written"]] or ["| (no such rows in this run) | | | | |"]
    lines += ["", f"2. Block-sparse at about 10% of the blocks: at least {SPARSE_MIN_SPEEDUP:g}x faster "
              f"than SDPA with the equivalent dense mask (`sdpa+mask`), with at most "
              f"{SPARSE_MAX_MEMORY:g} of its peak memory. Sparser layouts should do better, "
              "denser ones worse.", "",
              "| case | pass | density | masked SDPA time / stfast time | stfast memory / masked SDPA "
              "memory | both met |", "|---|---|---|---|---|---|"]
    lines += [f"| {b['case']} | {b['pass_']} | {b['density']:.3f} | {b['speedup']:.2f}x | "
              f"{_fmt(b['memory'], '.3f')} | {_yes(b['met'])} |" for b in t["block_sparse"]] \
        or ["| (no such rows in this run) | | | | | |"]
    return "\n".join(lines)


def load_warning(before: float, during: float | None, cores: int, threads: int) -> str | None:
    """A warning when other work loads the machine: before the run (1-minute load
    average), or during it (the median 1-minute load average minus this run's threads)."""
    limit = LOADED_PER_CORE * cores
    others = max(before, (during - threads) if during is not None else 0.0)
    if others <= limit:
        return None
    when = "before the run" if before > limit else "during the run, beyond this run's own threads"
    fewer = (" Fewer threads (--threads 1) suffer less: threads that wait for each other at "
             "the end of every op lose their turn on a busy machine.") if threads > 1 else ""
    return (f"WARNING: the machine is loaded ({when}: {others:.1f} on {cores} cores, threshold "
            f"{limit:.1f}); CPU times are inflated and noisy, and ratios between rows are less "
            f"reliable. Rerun on an idle machine, or compare runs only at the same load.{fewer}")


def conditions(meta: dict) -> str:
    """One line with what CPU figures depend on: threads, cores, load; and the duration."""
    load = meta["load_average"]
    during = f" / {meta['load_during']:.1f} during" if meta.get("load_during") is not None else ""
    return (f"Conditions: {meta['device']}, torch threads: {meta['threads']} of {meta['cpu_count']} cores, "
            f"1-minute load average {load[0]:.1f} before{during} / {load[3]:.1f} after the run; "
            f"took {clock(meta['elapsed_s'])} (estimated {clock(meta['estimated_s'])}).")


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
             f"preset `{meta['preset']}`, passes {', '.join(meta['passes'])}, commit {meta['commit']}.", "",
             conditions(meta) + " Other work on the machine makes CPU times noisy.", ""]
    if meta.get("load_warning"):
        lines += [f"**{meta['load_warning']}**", ""]
    lines += [f"Command: `{meta['command']}`", "",
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
    lines += [targets_markdown(targets(rows)), ""]
    if comparison is not None:
        lines += ["## comparison", "", compare_text(comparison, markdown=True), ""]
    return "\n".join(lines)


def _impl_order(name: str) -> tuple:
    """stfast's backends first, then its distributed strategy, then the alternatives."""
    return (0 if name.startswith("stfast") else 1 if name == "sp-dsp" else 2, name)


def _not_run(reason: str | None) -> str:
    text = (reason or "not run").split(";")[0].split(" (")[0]
    return "not run: " + (text if len(text) <= 48 else text[:45] + "...")


def _suite_title(suite: str) -> str:
    if suite == "distributed":
        return "distributed: DSP vs Ulysses (gloo)"
    return {"causal": "causal and dense [B,H,L,D]", "spatiotemporal": "spatio-temporal [B,T,N,H,D]",
            "block_sparse": "block-sparse"}.get(suite, suite)


def plot_layout(rows, passes) -> tuple[list, list, list, float]:
    """Where the plot puts each bar: y runs downwards in the table's order, a heading
    per suite, then per case one slot per implementation that case timed in some pass.
    Returns ``(slots [(y, suite, case, impl)], case ticks [(y, case)], suite headings
    [(y, title)], total height)``."""
    timed = [r for r in rows if r["status"] == "ok" and r.get("speedup") and r["pass"] in passes]
    impls = sorted(dict.fromkeys(r["impl"] for r in timed), key=_impl_order)
    have = {(r["suite"], r["case"], r["impl"]) for r in timed}
    cases = list(dict.fromkeys((r["suite"], r["case"]) for r in timed))
    slots, ticks, headings, y = [], [], [], 0.0
    for suite in dict.fromkeys(s for s, _ in cases):
        headings.append((y, _suite_title(suite)))
        y += 1.2
        for case in [c for s, c in cases if s == suite]:
            mine = [n for n in impls if (suite, case, n) in have]
            ticks.append((y + (len(mine) - 1) / 2, case))
            slots += [(y + i, suite, case, n) for i, n in enumerate(mine)]
            y += len(mine) + 0.6
    return slots, ticks, headings, y


def plot(rows, path: Path, meta: dict | None = None) -> str | None:
    """Speed-up of every timed implementation against the best alternative, one panel
    per pass, cases in the table's order, each case with only the implementations it
    ran.  Returns why no plot was written, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
        from matplotlib.ticker import FixedLocator, NullFormatter
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no PNG written"
    timed = [r for r in rows if r["status"] == "ok" and r.get("speedup")]
    if not timed:
        return "no timed rows: no PNG written"
    passes = list(dict.fromkeys(r["pass"] for r in timed))
    impls = sorted(dict.fromkeys(r["impl"] for r in timed), key=_impl_order)
    palette = [plt.get_cmap("tab10")(i) for i in range(10)] + [plt.get_cmap("Dark2")(i) for i in range(8)]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(impls)}
    speedup = {(r["suite"], r["case"], r["pass"], r["impl"]): r["speedup"] for r in timed}
    reasons = {(r["suite"], r["case"], r["pass"], r["impl"]): r["reason"] for r in rows if r["status"] != "ok"}

    slots, ticks, headings, y = plot_layout(rows, passes)
    values = list(speedup.values()) + [1.0]
    lo, hi = min(values) / 1.6, max(values) * 1.6
    for mantissas in ((1, 1.5, 2, 3, 5, 7), (1, 2, 5), (1,)):
        xticks = [m * 10.0 ** e for e in range(-3, 4) for m in mantissas if lo <= m * 10.0 ** e <= hi]
        if len(xticks) <= 9:
            break

    fig, axes = plt.subplots(1, len(passes), figsize=(max(10.0, 3.2 + 5.0 * len(passes)), 2.6 + 0.21 * y),
                             squeeze=False, sharey=True, layout="constrained")
    for ax, pass_ in zip(axes[0], passes):
        for pos, suite, case, name in slots:
            value = speedup.get((suite, case, pass_, name))
            if value is None:
                ax.text(lo * 1.05, pos, _not_run(reasons.get((suite, case, pass_, name))),
                        va="center", fontsize=8, color="0.45", style="italic")
                continue
            ax.barh(pos, value, height=0.8, color=colors[name])
            ax.text(value * 1.04, pos, f"{value:.2f}x", va="center", fontsize=8)
        for pos, _ in headings[1:]:
            ax.axhline(pos - 0.5, color="0.6", linewidth=0.8)
        ax.axvline(1.0, color="black", linewidth=1.2)
        ax.text(1.0, -0.02, " 1x = best alternative", transform=ax.get_xaxis_transform(),
                fontsize=9, va="top", ha="left")
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_locator(FixedLocator(xticks))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(xticks, [f"{t:g}x" for t in xticks], fontsize=9)
        ax.tick_params(axis="x", which="minor", length=0)
        ax.xaxis.tick_top()
        ax.xaxis.set_label_position("top")
        ax.set_xlabel("speed-up: best alternative's time / this time (log scale; right of 1x is faster)",
                      fontsize=9)
        ax.set_title(pass_ if pass_ != "fwd+bwd" else "fwd+bwd (training step)", fontsize=12,
                     fontweight="bold")
        ax.grid(axis="x", alpha=0.3)
    ax0 = axes[0][0]
    ax0.set_ylim(y, -0.6)  # once, on the shared axis: table order from the top
    ax0.set_yticks([p for p, _ in ticks] + [p for p, _ in headings],
                   [c for _, c in ticks] + [h for _, h in headings])
    for label in ax0.get_yticklabels()[len(ticks):]:
        label.set_fontweight("bold")
        label.set_fontsize(11)
    for label in ax0.get_yticklabels()[:len(ticks)]:
        label.set_fontsize(10)
    ax0.tick_params(axis="y", length=0)
    fig.legend(handles=[Patch(color=colors[n], label=n) for n in impls], loc="outside lower center",
               ncol=min(6, len(impls)), fontsize=10, frameon=False)
    if meta is not None:
        loaded = " (loaded: times are noisy)" if meta.get("load_warning") else ""
        threads = f"{meta['threads']} thread" + ("s" if meta["threads"] != 1 else "")
        fig.suptitle(f"stfast against the best alternative\n{meta['device']}, {threads}, "
                     f"{meta['dtype']}, torch {meta['torch']}, load average {meta['load_average'][0]:.1f}"
                     f"{loaded}", fontsize=13)
    fig.savefig(path, dpi=100)
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
