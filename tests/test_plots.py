"""clbench plot / report: files are written, non-empty, and show the right numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from run_folders import write_run

from clbench import metrics
from clbench.cli import main
from clbench.errors import UsageError
from clbench.reporting import plots, report
from clbench.reporting.runs import filter_runs, load_runs
from clbench.reporting.summary import TableOptions, assign_rows


def make_run(root: Path, scenario: str, strategy: str, seed: int, accuracy, **kwargs) -> Path:
    tasks = len(accuracy[0])
    config = {
        "protocol_version": 1, "strategy": strategy, "scenario": scenario,
        "backbone": kwargs.pop("backbone", "vit-tiny-random"), "seed": seed,
        "strategy_options": {"lr": 0.01}, "scenario_options": {}, "backbone_options": {},
    }  # fmt: skip
    folder = root / scenario / strategy / f"{config['backbone']}_seed{seed}_x"
    counts = kwargs.pop("counts", [100] * tasks)
    return write_run(folder, config, accuracy, counts, **kwargs)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    make_run(root, "digits-offline", "l2p", 0, [[90, 0, 0], [80, 70, 0], [70, 60, 80]])
    make_run(root, "digits-offline", "l2p", 1, [[92, 0, 0], [84, 72, 0], [74, 66, 78]])
    make_run(root, "digits-offline", "seq-ft", 0, [[95, 0, 0], [40, 90, 0], [20, 30, 95]])
    make_run(root, "digits-offline", "seq-ft", 1, [[80, 0, 0]], state="failed")
    make_run(root, "fewrel-offline", "l2p", 0, [[80, 0], [60, 70]], backbone="minilm-l6",
             counts=[50, 150])  # fmt: skip
    return root


def test_forgetting_per_task_is_the_terms_of_ffm() -> None:
    matrix = np.array([[90, 0, 0], [80, 70, 0], [70, 60, 80]], dtype=float)
    assert metrics.forgetting_terms(matrix).tolist() == [20.0, 10.0]
    assert np.mean(metrics.forgetting_terms(matrix)) == metrics.final_forgetting(matrix)
    assert metrics.average_accuracy_curve(matrix).tolist() == [90.0, 75.0, 70.0]
    assert metrics.average_accuracy_curve(matrix)[-1] == metrics.final_average_accuracy(matrix)


def test_plot_files_are_written_and_not_empty(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures"
    written = plots.make_plots(plots.PlotRequest(paths=[results], out_dir=out,
                                                 formats=("png", "pdf")))  # fmt: skip
    names = sorted(path.name for path in written)
    assert names == sorted(
        f"{stem}.{fmt}"
        for stem in (
            "curves_digits-offline_vit-tiny-random",
            "forgetting_digits-offline_vit-tiny-random",
            "heatmap_digits-offline_vit-tiny-random_l2p",
            "heatmap_digits-offline_vit-tiny-random_seq-ft",
            "curves_fewrel-offline_minilm-l6",
            "forgetting_fewrel-offline_minilm-l6",
            "heatmap_fewrel-offline_minilm-l6_l2p",
        )
        for fmt in ("png", "pdf")
    )
    for path in written:
        data = path.read_bytes()
        assert len(data) > 1000, path
        assert data.startswith(b"\x89PNG" if path.suffix == ".png" else b"%PDF"), path


def test_curves_show_mean_and_band_over_seeds(results: Path) -> None:
    runs = assign_rows(load_runs([results], with_matrix=True),
                              TableOptions())  # fmt: skip
    specs = plots.build_figures(runs, TableOptions(), ["curves"], "auto")
    digits = next(s for s in specs if s.name == "curves_digits-offline_vit-tiny-random")
    axes = digits.figure.axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert set(lines) == {"l2p (n=2)", "seq-ft (n=1)"}  # the failed seq-ft run is not drawn
    # l2p: average accuracy on seen tasks, mean of the two seeds
    expected = np.mean([[90, 75, 70], [92, 78, 218 / 3]], axis=0)
    np.testing.assert_allclose(lines["l2p (n=2)"].get_ydata(), expected)
    assert len(axes.collections) == 1  # one ± std band: seq-ft has one seed, no band
    colours = {line.get_color().upper() for line in lines.values()}
    assert colours <= set(plots.OKABE_ITO)


def test_a_legend_of_long_settings_stays_inside_the_figure(tmp_path: Path) -> None:
    root = tmp_path / "results"
    for index in range(4):
        make_run(
            root, "fewrel-offline", f"l2p-{index}", 0, [[90, 0], [80, 70]], backbone="minilm-l6"
        )
    runs = assign_rows(load_runs([root], with_matrix=True), TableOptions())
    # settings as long as "epochs=1, precision=(not recorded)" and longer
    runs["setting"] = "epochs=1, precision=(not recorded), " + runs["strategy"]
    for spec in plots.build_figures(runs, TableOptions(), ["curves", "forgetting"], "auto"):
        figure = spec.figure
        figure.savefig(tmp_path / "probe.png")  # lays the figure out
        legend = figure.legends[0].get_window_extent()
        page = figure.bbox
        assert page.x0 - 1 <= legend.x0 and legend.x1 <= page.x1 + 1, spec.name


def test_heatmap_is_the_mean_matrix_with_unseen_tasks_blank(results: Path) -> None:
    runs = assign_rows(load_runs([results], with_matrix=True),
                              TableOptions())  # fmt: skip
    rows = plots.row_runs(runs, TableOptions())
    l2p = next(
        r for r in rows if r.key["strategy"] == "l2p" and r.key["scenario"] == "digits-offline"
    )
    matrix, seeds = plots.mean_matrix(l2p)
    assert seeds == 2 and matrix[2, 0] == pytest.approx(72.0)
    figure = plots.heatmap_figure(matrix, "test")
    shown = figure.axes[0].images[0].get_array()
    assert shown.mask[0, 1] and shown.mask[1, 2] and not shown.mask[2, 0]


def test_heatmap_leaves_entries_not_evaluated_blank_not_zero(tmp_path: Path) -> None:
    # seed 0 evaluated only the seen tasks (null above the diagonal), seed 1 all of them
    make_run(tmp_path, "digits-offline", "l2p", 0, [[90, None], [70, 60]])
    make_run(tmp_path, "digits-offline", "l2p", 1, [[80, 0], [50, 40]])
    runs = assign_rows(load_runs([tmp_path], with_matrix=True), TableOptions())
    (row,) = plots.row_runs(runs, TableOptions())
    matrix, seeds = plots.mean_matrix(row)
    assert seeds == 2 and matrix[1].tolist() == [60.0, 50.0] and np.isnan(matrix[0, 1])
    figure = plots.heatmap_figure(matrix, "test")
    shown = figure.axes[0].images[0].get_array()
    assert shown.mask.tolist() == [[False, True], [False, False]]
    assert sorted(text.get_text() for text in figure.axes[0].texts) == ["50", "60", "85"]
    # an entry not evaluated below the diagonal (never written by the run loop) is blank too
    hole = plots.heatmap_figure(np.array([[90.0, np.nan], [np.nan, 60.0]]), "test")
    assert hole.axes[0].images[0].get_array().mask.tolist() == [[False, True], [True, False]]
    assert sorted(text.get_text() for text in hole.axes[0].texts) == ["60", "90"]
    # the curves and forgetting bars of such runs are those of runs with zeros
    curves = plots.curve_series(row, "average", 1)
    assert curves.mean.tolist() == pytest.approx([85.0, (65 + 45) / 2])
    assert plots.forgetting_series(row, 1).mean.tolist() == pytest.approx([25.0])


def test_plot_cli_and_errors(results: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    code = main(["plot", str(results), "--kind", "forgetting", "--out", str(out), "--scenario",
                 "digits*", "-f", "svg"])  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "forgetting_digits-offline_vit-tiny-random.svg"
    ]
    capsys.readouterr()
    assert main(["plot", str(results), "--kind", "pie"]) == 2
    assert "unknown plot kind 'pie'" in capsys.readouterr().err
    assert main(["plot", str(results), "-f", "gif"]) == 2
    with pytest.raises(UsageError, match="no complete run"):
        only_failed = filter_runs(load_runs([results]), {"strategy": ["seq-ft"],
                                                                       "seed": ["1"]})  # fmt: skip
        plots.build_figures(assign_rows(only_failed, TableOptions()),
                            TableOptions(), plots.KINDS, "auto")  # fmt: skip


def test_html_report_is_self_contained(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    assert main(["report", str(results), "--out", str(out), "--title", "Digits & FewRel"]) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<h1>Digits &amp; FewRel</h1>" in page
    assert page.count("<table>") == 4  # summary, per task, published numbers, not averaged
    assert page.count('src="data:image/png;base64,') == 7
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "1 failed" in page and "protocol differs" in page


def test_markdown_report(results: Path, tmp_path: Path) -> None:
    request = report.ReportRequest(paths=[results], out=tmp_path / "md", fmt="markdown",
                                   reference=False)  # fmt: skip
    page = report.write_report(request)
    text = page.read_text()
    assert page.name == "report.md" and "## Accuracy and forgetting (%)" in text
    assert "Ours beside the published numbers" not in text
    images = [line for line in text.splitlines() if line.startswith("![")]
    assert len(images) == 7
    for line in images:
        assert (page.parent / line.split("](")[1].rstrip(")")).stat().st_size > 1000
