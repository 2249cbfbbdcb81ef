"""``analyze.py contrast-stats | correlation | lda | compare | report``: statistics of a stored
analysis, the comparison of two analyses and the HTML report, computed on the CPU from a results
file and written into it (compare's figures: into <run directory>/figures; the report: into
<run directory>/report). No network runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from jsonargparse import Namespace

from callbacks.wandb_logging import (
    comparison_record,
    contrast_stats_record,
    correlation_record,
    lda_record,
)
from cli.options import build_statistics_parser
from cli.reporting import Log, input_error, log_wandb, print_outputs, record_log, wandb_settings
from sensitivity import comparison, html_report, stats
from sensitivity.html_page import number


def run_statistics(method: str, args: Sequence[str]) -> int:
    """Run one statistics command on its command line.

    Args:
        method: contrast-stats, correlation, lda, compare or report.
        args: the command line after the method.

    Returns:
        The exit status: 0, 2 for bad input (missing file or analysis, wrong method...) with
        nothing written, 1 when W&B failed.
    """
    parser = build_statistics_parser(method)
    try:
        cfg = parser.parse_args(list(args))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        mode = None if method == "report" else wandb_settings(cfg)
        lines, log = _statistics(method, cfg)
    except (ValueError, OSError) as error:
        return input_error(method, error)
    status = 0
    if log is not None:
        results = Path(cfg.results).expanduser()
        wandb_lines, status = log_wandb(cfg, mode, results, f"{method} {cfg.analysis}", log,
                                        cfg.analysis)
        lines += wandb_lines
    print_outputs(lines)
    return status


def _statistics(method: str, cfg: Namespace) -> tuple[list[str], Log | None]:
    """Run one statistics method; returns the lines to print and its W&B log (None: the
    report, which is not logged)."""
    if method == "report":
        names = None if cfg.analysis is None else [cfg.analysis]
        index = html_report.write_report(cfg.results, cfg.output, names)
        return [f"report          {index}  (PNGs next to it)"], None
    if cfg.analysis is None:
        raise ValueError(f"analyze.py {method} needs --analysis NAME (an analysis in "
                         f"{cfg.results})")
    run = {"contrast-stats": _contrast_stats, "correlation": _correlation, "lda": _lda,
           "compare": _compare}[method]
    return run(cfg, f"results file    {Path(cfg.results)}")


def _contrast_stats(cfg: Namespace, where: str) -> tuple[list[str], Log]:
    """Wilcoxon signed-rank tests of a contrast analysis (``stats.contrast_statistics``)."""
    out = stats.contrast_statistics(cfg.results, cfg.analysis, alpha=cfg.alpha,
                                    overwrite=cfg.overwrite, progress=cfg.progress)
    lines = [f"{where}  ({out['group']}: {out['n_pairs']} image pairs)",
             f"units with BY q < {cfg.alpha} per layer:"]
    lines += [f"  {layer:<14} " + ", ".join(f"{a} {c}" for a, c in counts.items())
              for layer, counts in out["significant"].items()]
    return lines, record_log(lambda: contrast_stats_record(out, cfg.alpha))


def _correlation(cfg: Namespace, where: str) -> tuple[list[str], Log]:
    """Spearman correlations across units (``stats.correlation_statistics``)."""
    out = stats.correlation_statistics(cfg.results, cfg.analysis, values=cfg.value_types,
                                       overwrite=cfg.overwrite, progress=cfg.progress)
    lines = [f"{where}  ({out['group']}: {', '.join(out['values'])} x "
             f"{len(out['layers'])} layers)"]
    return lines, record_log(lambda: correlation_record(
        *stats.read_tree(cfg.results, stats.CORRELATION_GROUP, cfg.analysis)
    ))


def _lda(cfg: Namespace, where: str) -> tuple[list[str], Log]:
    """Cross-validated LDA of the channel maps by variable (``stats.lda_statistics``)."""
    out = stats.lda_statistics(cfg.results, cfg.analysis, values=cfg.value_types,
                               n_folds=cfg.folds, n_repeats=cfg.repeats, seed=cfg.seed,
                               overwrite=cfg.overwrite, progress=cfg.progress)
    lines = [f"{where}  ({out['group']})", f"LDA accuracy (chance {out['chance']:.3f}):"]
    for layer, values in out["accuracy"].items():
        lines += [f"  {layer:<14} {key} {mean:.3f} +- {sd:.3f}"
                  for key, (mean, sd) in values.items()]
    if out["skipped"]:
        lines.append(f"skipped (no spatial maps): {', '.join(out['skipped'])}")
    return lines, record_log(lambda: lda_record(out))


def _compare(cfg: Namespace, where: str) -> tuple[list[str], Log]:
    """Two analyses compared (``stats.comparison_statistics``) and its figures as PNGs in
    <results dir>/figures (``comparison.save_figures``)."""
    out = stats.comparison_statistics(cfg.results, cfg.analysis, cfg.other,
                                      values=cfg.value_types, top=cfg.top,
                                      overwrite=cfg.overwrite, progress=cfg.progress)
    folder = Path(cfg.results).parent / "figures"
    figures = comparison.save_figures(comparison.read_comparison(cfg.results, out["name"]),
                                      folder)
    (a, b), (key_a, key_b) = out["analyses"], out["values"]
    lines = [f"{where}  ({out['group']}: {a} {key_a} vs {b} {key_b}, "
             f"{len(out['layers'])} layers)",
             "Spearman correlation of the two maps per layer (units valid in both):"]
    lines += [f"  {layer:<14} " + ", ".join(f"{v} {number(rho, 2)}" for v, rho in values.items())
              for layer, values in out["spearman"].items()]
    lines.append(f"figures         {folder / out['name']}_*.png ({len(figures)} PNGs: per "
                 f"layer scatter and covariates, decay)")
    return lines, record_log(lambda: comparison_record(
        *stats.read_tree(cfg.results, stats.COMPARISON_GROUP, out["name"]), figures
    ))
