"""``bmojo-report``: the benchmark JSON files as one markdown report with PNG plots.

    bmojo-report bench/results/*.json --out docs/results

Each JSON file names its benchmark in ``"bench"``: ``mqar`` (bench/mqar.py), ``extrapolation``
(bench/extrapolation.py), ``throughput`` (bench/throughput.py) or ``decode`` (bench/decode.py). The report
is ``<out>/report.md``; every section has a table and a plot ``<out>/<bench>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

try:
    import matplotlib
except ImportError as error:
    raise ImportError("bmojo-report draws its plots with matplotlib: pip install -e '.[eval]'") from error

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from bmojo.eval.family import FAMILY, MEMBER_NAMES  # noqa: E402


def _name(member: str) -> str:
    return f"{MEMBER_NAMES.get(member, member)} ({member})"


def _order(members) -> list[str]:
    return sorted(members, key=lambda m: FAMILY.index(m) if m in FAMILY else len(FAMILY))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# Language-model parameters (the budget members are matched on) and those only an auxiliary loss trains.
PARAMETER_COLUMNS = ("LM parameters", "aux parameters")


def _parameters(row: dict) -> list[str]:
    """A row's two parameter cells (``-`` for the auxiliary count of a result recorded without it)."""
    auxiliary = row.get("auxiliary_parameters")
    return [f"{row['parameters']:,}", "-" if auxiliary is None else f"{auxiliary:,}"]


def _setting(run: dict) -> str:
    """The filler of an MQAR run, with the variant its sweep was tagged with."""
    return run["filler"] + (f" ({run['variant']})" if run.get("variant") else "")


def mqar_section(report: dict, figure: Path) -> str:
    """A row per run; plots of accuracy against K and against M, and of every member at the common K."""
    runs = report["runs"]
    settings = sorted({_setting(run) for run in runs}, key=lambda f: (not f.startswith("periodic"), f))
    order = _order(FAMILY)

    def rank(run: dict) -> tuple:
        return settings.index(_setting(run)), order.index(run["member"]), run["num_pairs"], run["memory_size"] or 0

    rows = []
    for run in sorted(runs, key=rank):
        memory = ", ".join(f"{share:.2f}" for share in run.get("value_in_memory", [])) or "-"
        rows.append(
            [_name(run["member"]), _setting(run), str(run["num_pairs"]), str(run.get("memory_size") or "-"),
             f"{run['accuracy']:.3f}", memory, *_parameters(run), f"{run['train_s'] / 60:.1f}"]
        )  # fmt: skip
    _mqar_figure(runs, settings, order, figure)
    chance = report.get("chance")
    note = f"Chance is {chance:.3f} (one of the values). " if chance else ""
    return (
        f"{note}M: B'MOJO's memory size (entries). `value in memory`: per B layer, the share of queries whose "
        "value the memory held when the key was queried.\n\n"
        + _table(["member", "filler", "K", "M", "accuracy", "value in memory", *PARAMETER_COLUMNS, "train min"], rows)
    )


def _mqar_figure(runs: list[dict], settings: list[str], order: list[str], figure: Path) -> None:
    """Left: accuracy against K (one line per member and M); middle: B'MOJO against M (one line per K), the
    dotted lines at M = 3K; right: every member at the most common K, one group of bars per filler."""
    fig, (by_pairs, by_memory, by_member) = plt.subplots(1, 3, figsize=(16, 4))
    main = [r for r in runs if _setting(r) == settings[0]]
    for member, memory_size in sorted(
        {(r["member"], r["memory_size"]) for r in main}, key=lambda m: (order.index(m[0]), m[1] or 0)
    ):
        points = sorted(
            (r["num_pairs"], r["accuracy"]) for r in main if (r["member"], r["memory_size"]) == (member, memory_size)
        )
        by_pairs.plot(
            *zip(*points, strict=True), marker="o", label=_name(member) + (f", M={memory_size}" if memory_size else "")
        )
    by_pairs.set_xticks(sorted({r["num_pairs"] for r in main}))
    by_pairs.set(title=f"accuracy against K ({settings[0]} filler)", xlabel="key-value pairs K", ylabel="accuracy")
    by_pairs.legend(fontsize=7)
    memory_runs = [r for r in main if r["memory_size"]]
    for pairs in sorted({r["num_pairs"] for r in memory_runs}):
        points = sorted((r["memory_size"], r["accuracy"]) for r in memory_runs if r["num_pairs"] == pairs)
        (line,) = by_memory.plot(*zip(*points, strict=True), marker="o", label=f"K={pairs}")
        by_memory.axvline(3 * pairs, color=line.get_color(), linestyle=":", linewidth=1)
    by_memory.set_xticks(sorted({r["memory_size"] for r in memory_runs}))
    by_memory.set(title="B'MOJO against its memory size (dotted: M = 3K)", xlabel="memory size M", ylabel="accuracy")
    by_memory.legend(fontsize=7)
    common = max({r["num_pairs"] for r in runs}, key=lambda k: sum(r["num_pairs"] == k for r in runs))
    members = [m for m in order if any(r["member"] == m for r in runs)]
    width = 0.8 / len(settings)
    for index, setting in enumerate(settings):
        accuracy = {
            r["member"]: r["accuracy"]
            for r in runs
            if _setting(r) == setting
            and r["num_pairs"] == common
            and r["memory_size"] in (None, max(x["memory_size"] or 0 for x in runs))
        }
        positions = [i + index * width for i, m in enumerate(members) if m in accuracy]
        by_member.bar(positions, [accuracy[m] for m in members if m in accuracy], width, label=setting)
    by_member.set_xticks([i + 0.4 - width / 2 for i in range(len(members))], members)
    by_member.set(title=f"every member at K={common}", ylabel="accuracy")
    by_member.legend(fontsize=7)
    for axis in (by_pairs, by_memory, by_member):
        axis.set_ylim(-0.02, 1.02)
    _save(fig, figure)


def extrapolation_section(report: dict, figure: Path) -> str:
    """Perplexity at multiples of the training length, and its ratio to the perplexity at 1x."""
    train_len = report["train_len"]
    lengths = sorted({row["length"] for run in report["runs"] for row in run["perplexity"]})
    rows = []
    fig, axis = plt.subplots(figsize=(6, 4))
    for run in sorted(report["runs"], key=lambda r: FAMILY.index(r["member"]) if r["member"] in FAMILY else 99):
        by_length = {row["length"]: row["perplexity"] for row in run["perplexity"]}
        base = by_length[train_len]
        label = _name(run["member"]) + (f" ({run['variant']})" if run.get("variant") else "")
        rows.append([label] + [f"{by_length[n]:.2f} ({by_length[n] / base:.3f})" for n in lengths])
        axis.plot(lengths, [by_length[n] for n in lengths], marker="o", label=label)
    axis.set(xscale="log", xlabel="context length", ylabel="perplexity")
    _label_ticks(axis, lengths)
    axis.axvline(train_len, color="grey", linestyle=":", linewidth=1)
    axis.set_title(f"held-out perplexity, trained at {train_len}")
    axis.legend(fontsize=8)
    _save(fig, figure)
    header = ["member"] + [f"{n} ({n // train_len}x)" if n % train_len == 0 else str(n) for n in lengths]
    return f"Perplexity (ratio to 1x) on the same held-out tokens; trained at {train_len}.\n\n" + _table(header, rows)


def throughput_section(report: dict, figure: Path) -> str:
    rows = []
    series: dict[str, list[tuple[int, float]]] = {}
    for result in report["results"]:
        for member in _order(result["members"]):
            row = result["members"][member]
            ratios = [f"{row[key]:.2f}" if key in row else "-" for key in ("vs_A", "vs_W")]
            rows.append(
                [str(result["seq_len"]), _name(member), *_parameters(row), f"{row['tokens_per_s']:,.0f}"] + ratios
            )
            series.setdefault(member, []).append((result["seq_len"], row["tokens_per_s"]))
    fig, axis = plt.subplots(figsize=(6, 4))
    for member in _order(series):
        axis.plot(*zip(*series[member], strict=True), marker="o", label=_name(member))
    axis.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="training tokens/s")
    _label_ticks(axis, [result["seq_len"] for result in report["results"]])
    axis.set_title("training step (forward + backward + AdamW)")
    axis.legend(fontsize=8)
    _save(fig, figure)
    model = report["model"]
    return (
        f"{report['tokens_per_step']} tokens a step, hidden {model['hidden_size']}, {model['num_hidden_layers']} "
        f"layers, window {model['window_size']}, memory {model['memory_size']}; {_where(report)}"
        + ("; every block compiled (`torch.compile`).\n\n" if report.get("compiled") else ".\n\n")
        + _table(["T", "member", *PARAMETER_COLUMNS, "tokens/s", "vs A", "vs W"], rows)
    )


def _where(report: dict) -> str:
    """What ran a benchmark: its CPU threads, or the GPU (reports written before ``--device`` were CPU runs)."""
    precision = ", forward under bf16 autocast" if report.get("autocast") == "bf16" else ""
    if report.get("device", "cpu") == "cuda":
        return f"on {report['machine']}{precision}"
    threads = report["threads"]
    kept = ", freed host memory kept for reuse" if report.get("host_memory_kept") else ""
    return f"{threads} CPU thread{'' if threads == 1 else 's'}{precision}{kept}"


def decode_section(report: dict, figure: Path) -> str:
    rows = []
    series: dict[str, list[tuple[int, float]]] = {}
    for result in report["results"]:
        for member in _order(result["members"]):
            row = result["members"][member]
            ratio = f"{row['vs_A']:.2f}" if "vs_A" in row else "-"
            rows.append(
                [
                    str(result["context"]),
                    _name(member),
                    f"{row['ms_per_token']:.2f}",
                    ratio,
                    f"{row['cache_bytes'] / 1024:,.0f}",
                ]
            )
            series.setdefault(member, []).append((result["context"], row["ms_per_token"]))
    fig, axis = plt.subplots(figsize=(6, 4))
    for member in _order(series):
        axis.plot(*zip(*series[member], strict=True), marker="o", label=_name(member))
    axis.set(xscale="log", yscale="log", xlabel="context length", ylabel="ms per decoded token")
    _label_ticks(axis, [result["context"] for result in report["results"]])
    axis.set_title("decoding one token from the cache" + (", compiled steps" if report.get("compiled") else ""))
    axis.legend(fontsize=8)
    _save(fig, figure)
    model = report["model"]
    batch = report.get("batch", 1)  # reports written before --batch decoded one sequence
    described = (
        f"Hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, window {model['window_size']}, "
        f"memory {model['memory_size']}; {_where(report)}; median of {report['decoded_tokens']} tokens"
        + ("" if batch == 1 else f", each a step of {batch} sequences")
        + (
            f"; every member through its compiled step (`compile_decoding`), timed after {report['warmup_tokens']} "
            "warm-up tokens."
            if report.get("compiled")
            else "; eager steps."
        )
    )
    return f"{described}\n\n" + _table(["context", "member", "ms/token", "vs A", "cache KiB"], rows)


def breakdown_section(report: dict, figure: Path) -> str:
    ms = report["ms"]
    fig, axis = plt.subplots(figsize=(6, 3.5))
    axis.barh(list(ms)[::-1], list(ms.values())[::-1])
    axis.set(xlabel="ms, forward + backward")
    axis.set_title(f"B'MOJO against sliding window at T = {report['seq_len']}")
    _save(fig, figure)
    model = report["model"]
    described = (
        f"T = {report['seq_len']}, batch {report['batch']}, hidden {model['hidden_size']}, "
        f"{model['num_hidden_layers']} layers, window {model['window_size']}, memory {model['memory_size']}; "
        f"{_where(report)}. Steps are whole training steps; the rest is one layer's op or mixer."
    )
    rows = [[name, f"{value:.1f}"] for name, value in ms.items()]
    rows += [["measured B/W", f"{report['measured B/W']:.2f}"], ["bound B/W", f"{report['bound B/W']:.2f}"]]
    return f"{described}\n\n" + _table(["", "ms"], rows)


def geometry_section(report: dict, figure: Path) -> str:
    """Tokens/s of each member at each (sequence, window) pair, relative to the member's first pair."""
    rows, series = [], {}
    for row in report["results"]:
        label = f"T={row['seq_len']} w={row['window']}"
        rows.append([_name(row["member"]), str(row["seq_len"]), str(row["window"]), f"{row['tokens_per_s']:,.0f}"]
                    + [f"{row['vs_first']:.2f}"])  # fmt: skip
        series.setdefault(label, []).append((row["member"], row["tokens_per_s"]))
    fig, axis = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(series)
    for index, (label, points) in enumerate(series.items()):
        axis.bar([i + index * width for i in range(len(points))], [tokens for _, tokens in points], width, label=label)
    members = [member for member, _ in next(iter(series.values()))]
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(members))], members)
    axis.set(ylabel="training tokens/s", title="pretraining geometry: sequence length T, window w")
    axis.legend(fontsize=8)
    _save(fig, figure)
    model = report["model"]
    described = (
        f"{report['tokens_per_step']} tokens a step, hidden {model['hidden_size']}, {model['num_hidden_layers']} "
        f"layers, memory {model['memory_size']}; {_where(report)}. `vs first`: tokens/s against the member's first "
        "geometry in the same run (A ignores the window, so its ratio shows the run's noise)."
    )
    return f"{described}\n\n" + _table(["member", "T", "window", "tokens/s", "vs first"], rows)


SECTIONS: dict[str, tuple[str, Callable[[dict, Path], str]]] = {
    "mqar": ("Multi-query associative recall", mqar_section),
    "extrapolation": ("Length extrapolation", extrapolation_section),
    "throughput": ("Training throughput", throughput_section),
    "decode": ("Decoding", decode_section),
    "breakdown": ("Where B'MOJO's training step differs from sliding window's", breakdown_section),
    "geometry": ("Pretraining geometry", geometry_section),
}


def _label_ticks(axis, values: list[int]) -> None:
    """Label a log x axis at the measured values only."""
    axis.set_xticks(values, [str(v) for v in values])
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_report(paths: list[Path], out_dir: Path) -> Path:
    """Write ``out_dir/report.md`` and one PNG per JSON file (named after it); returns the markdown's path.

    Sections follow the order of :data:`SECTIONS`; a benchmark given twice (say, at two model sizes) gets a
    section per file, titled with the file's name.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = []
    for path in paths:
        report = json.loads(path.read_text())
        kind = report.get("bench")
        if kind not in SECTIONS:
            raise ValueError(f"{path}: unknown benchmark {kind!r}; expected one of {', '.join(SECTIONS)}")
        loaded.append((kind, path, report))
    parts = ["# B'MOJO family: evaluation report\n"]
    for kind, (title, section) in SECTIONS.items():
        mine = [(path, report) for k, path, report in loaded if k == kind]
        for path, report in mine:
            heading = f"{title} ({path.stem})" if len(mine) > 1 else title
            figure = out_dir / f"{path.stem}.png"
            parts.append(f"## {heading}\n\n{section(report, figure)}\n\n![{heading}]({figure.name})\n")
    markdown = out_dir / "report.md"
    markdown.write_text("\n".join(parts))
    return markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bmojo-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="JSON files written by the bench/ scripts")
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="folder of report.md and the PNGs")
    args = parser.parse_args(argv)
    try:
        markdown = build_report(args.results, args.out)
    except (OSError, ValueError, KeyError) as error:
        print(f"bmojo-report: error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {markdown}")


if __name__ == "__main__":
    main()
