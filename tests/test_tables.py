"""clbench table: golden output from hand-made run folders, statistics, formats, errors."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from run_folders import write_run

from clbench import metrics
from clbench.cli import main
from clbench.errors import UsageError
from clbench.reporting.display import TableRequest, build_tables, main_table
from clbench.reporting.reference import load_reference
from clbench.reporting.render import render
from clbench.reporting.runs import filter_runs, find_run_folders, load_runs
from clbench.reporting.summary import TableOptions, assign_rows, summarise
from clbench.results import RunFolder, write_run_folder

REPO = Path(__file__).resolve().parents[1]


def make_run(
    root: Path,
    scenario: str,
    strategy: str,
    seed: int,
    accuracy: list[list[float]],
    *,
    counts: list[int] | None = None,
    backbone: str = "vit-tiny-random",
    state: str = "complete",
    protocol_version: int = 1,
    stamp: str = "20260101-000000",
    data_dir: str = "/data",
    **strategy_options: object,
) -> Path:
    """A run folder with the given accuracy matrix (rows = finished tasks, in %); every
    file (progress, metrics, matrix CSV) is derived from it, so they agree."""
    tasks = len(accuracy[0])
    config = {
        "clbench_version": "0.1.0",
        "protocol_version": protocol_version,
        "strategy": strategy,
        "scenario": scenario,
        "backbone": backbone,
        "seed": seed,
        "preset": "default",
        "device": "cpu",
        "strategy_options": {"lr": 0.01, "epochs": 1, "eval_batch_size": 64, **strategy_options},
        "scenario_options": {"num_experiences": tasks, "data_file": f"{data_dir}/{scenario}.json"},
        "backbone_options": {},
    }
    folder = root / scenario / strategy.rpartition(":")[2] / f"{backbone}_seed{seed}_{stamp}"
    return write_run(folder, config, accuracy, counts or [100] * tasks, state=state)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Two strategies on digits (2 tasks) and one on FewRel (unequal test sets), with a
    failed and a running run that must not be averaged."""
    root = tmp_path / "results"
    for seed, matrix in enumerate([[[90, 0], [80, 70]], [[92, 0], [84, 72]], [[88, 0], [82, 68]]]):
        make_run(root, "digits-offline", "l2p", seed, matrix)
    make_run(root, "digits-offline", "seq-ft", 0, [[95, 0], [50, 90]])
    make_run(root, "digits-offline", "seq-ft", 1, [[97, 0], [46, 92]])
    make_run(root, "digits-offline", "seq-ft", 2, [[99, 0]], state="failed")
    fewrel = {"counts": [50, 150], "backbone": "minilm-l6"}
    make_run(root, "fewrel-offline", "l2p", 0, [[80, 0], [60, 70]], **fewrel)
    make_run(root, "fewrel-offline", "l2p", 1, [[90, 0], [70, 80]], **fewrel)
    make_run(root, "fewrel-offline", "l2p", 2, [[84, 0]], state="running", **fewrel)
    return root


GOLDEN = """\
## Accuracy and forgetting (%)

| scenario | backbone | strategy | seeds | FAA ↑ | CAA ↑ | FFM ↓ | Seen ↑ | not averaged |
|---|---|---|---:|---:|---:|---:|---:|---|
| digits-offline | vit-tiny-random | l2p | 3 | **76.00 ± 1.73** | **83.00 ± 1.80** | **8.00 ± 2.00** | — |  |
| digits-offline | vit-tiny-random | seq-ft | 2 | 69.50 ± 0.71 | 82.75 ± 0.35 | 48.00 ± 4.24 | — | 1 failed |
| fewrel-offline | minilm-l6 | l2p | 2 | 70.00 ± 7.07 | 77.50 ± 7.07 | 20.00 ± 0.00 | 72.50 ± 7.07 | 1 running |

- mean ± std over seeds (sample std, ddof=1); bold: best per scenario and backbone.
- FAA: final average accuracy over all tasks; CAA: average incremental accuracy; \
FFM: final forgetting; Seen: sample-weighted accuracy on all seen classes after the last \
task (CRE metric).
- runs: 7 complete, 1 running, 1 failed (not averaged).
"""


def test_golden_markdown_table(results: Path) -> None:
    text = render(build_tables(TableRequest(paths=[results])), "markdown")
    assert text == GOLDEN


def test_cli_table_prints_the_golden_table(results: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["table", str(results)]) == 0
    assert capsys.readouterr().out == GOLDEN


def test_mean_and_std_match_a_hand_computation(results: Path) -> None:
    runs = load_runs([results])
    summary = summarise(assign_rows(runs, TableOptions()), TableOptions())
    row = summary[(summary["scenario"] == "digits-offline") & (summary["strategy"] == "l2p")].iloc[
        0
    ]
    faa = [75.0, 78.0, 75.0]  # (80 + 70) / 2, (84 + 72) / 2, (82 + 68) / 2
    caa = [(90 + 75) / 2, (92 + 78) / 2, (88 + 75) / 2]
    ffm = [10.0, 8.0, 6.0]
    assert row["seeds"] == 3
    assert row["faa_mean"] == pytest.approx(statistics.mean(faa))
    assert row["faa_std"] == pytest.approx(statistics.stdev(faa))
    assert row["caa_mean"] == pytest.approx(statistics.mean(caa))
    assert row["caa_std"] == pytest.approx(statistics.stdev(caa))
    assert row["ffm_std"] == pytest.approx(statistics.stdev(ffm))
    population = TableOptions(ddof=0)
    summary0 = summarise(assign_rows(runs, population), population)
    assert summary0.loc[row.name, "faa_std"] == pytest.approx(statistics.pstdev(faa))
    # The CRE metric pools test items: (0.6 * 50 + 0.7 * 150) / 200 = 67.5 for seed 0
    fewrel = summary[summary["scenario"] == "fewrel-offline"].iloc[0]
    assert fewrel["seen_mean"] == pytest.approx(statistics.mean([67.5, 77.5]))


def test_metrics_written_for_a_run_match_a_hand_computation(tmp_path: Path) -> None:
    matrix = [[90, 10, 0], [70, 80, 5], [60, 75, 85]]
    folder = make_run(tmp_path, "digits-offline", "l2p", 0, matrix)
    summary = json.loads((folder / "metrics.json").read_text())
    assert summary["faa"] == pytest.approx((60 + 75 + 85) / 3)
    assert summary["caa"] == pytest.approx((90 + (70 + 80) / 2 + (60 + 75 + 85) / 3) / 3)
    # task 0: best 90, last 60; task 1: best 80, last 75
    assert summary["ffm"] == pytest.approx((30 + 5) / 2)
    assert metrics.forgetting_terms(np.array(matrix)).tolist() == [30.0, 5.0]
    assert summary["experiences_finished"] == 3


def test_run_folder_files_keep_their_format(tmp_path: Path) -> None:
    # Resumed runs and runs made by older versions are read by the same code: the files'
    # bytes must not change (JSON with indent 2, 4-decimal CSV, one newline at the end).
    config = {"strategy": "l2p", "scenario": "digits-offline", "backbone": "b", "seed": 0}
    folder = Path(write_run_folder(tmp_path / "run", config, [[90, 0], [80, 76]], [50, 50]))
    assert (folder / "accuracy_matrix.csv").read_text() == (
        "after,exp0,exp1\n0,90.0000,0.0000\n1,80.0000,76.0000\n"
    )
    assert (folder / "status.json").read_text() == (
        '{\n  "state": "complete",\n  "finished_experiences": 2\n}\n'
    )
    assert (folder / "config.json").read_text() == json.dumps(config, indent=2) + "\n"
    written = json.loads((folder / "metrics.json").read_text())
    assert (folder / "metrics.json").read_text() == json.dumps(written, indent=2) + "\n"
    assert list(written) == [
        "faa", "caa", "ffm", "seen_accuracy", "experiences_finished", "train_seconds",
        "eval_seconds", "peak_memory_mb",
    ]  # fmt: skip
    records = RunFolder(folder).records()
    assert [r.correct for r in records] == [[45, 0], [40, 38]]
    assert list(json.loads((folder / "progress.json").read_text())[0]) == [
        "experience", "accuracy", "correct", "counts", "train_seconds", "eval_seconds",
        "peak_memory_mb", "extra", "checkpoint_bytes", "checkpoint_seconds", "epochs",
        "trained_parameters",
    ]  # fmt: skip
    # no temporary file is left beside the real ones
    assert sorted(p.name for p in folder.iterdir()) == [
        "accuracy_matrix.csv", "config.json", "metrics.json", "progress.json", "status.json",
    ]  # fmt: skip


def test_checkpoint_bytes_do_not_depend_on_the_temporary_name(tmp_path: Path) -> None:
    import torch

    from clbench.results.checkpoint import load_checkpoint, save_checkpoint

    payload = {"strategy": {"w": torch.arange(4.0)}, "finished_experiences": 1}
    first, second = RunFolder(tmp_path / "a"), RunFolder(tmp_path / "b")
    save_checkpoint(first, payload)
    save_checkpoint(second, payload)
    save_checkpoint(second, payload)  # over an existing one
    assert (first.path / "checkpoint.pt").read_bytes() == (
        second.path / "checkpoint.pt"
    ).read_bytes()
    buffer = io.BytesIO()  # what the checkpoint's bytes were before it went through fileio
    torch.save(payload, buffer)
    assert (first.path / "checkpoint.pt").read_bytes() == buffer.getvalue()
    assert torch.equal(load_checkpoint(second)["strategy"]["w"], torch.arange(4.0))
    assert sorted(p.name for p in second.path.iterdir()) == ["checkpoint.pt"]


def test_incomplete_runs_are_listed_never_averaged(results: Path) -> None:
    request = TableRequest(paths=[results], include_incomplete=True)
    text = render(build_tables(request), "markdown")
    listing = text.split("## Runs not averaged")[1]
    assert "| digits-offline | vit-tiny-random | seq-ft | 2 | failed | 1/2 | 99.00 |" in listing
    assert "| fewrel-offline | minilm-l6 | l2p | 2 | running | 1/2 | 84.00 |" in listing


def test_an_option_a_run_predates_is_labelled_not_recorded(tmp_path: Path) -> None:
    # runs made before an option existed have no value for it: their row must not pool
    # with runs that set it, and the label says why they differ
    root = tmp_path / "r"
    make_run(root, "fewrel-offline", "l2p", 0, [[90, 0], [80, 70]])
    make_run(
        root,
        "fewrel-offline",
        "l2p",
        0,
        [[90, 0], [80, 60]],
        precision="bf16",
        stamp="20260102-000000",
    )
    summary = summarise(load_runs([root]), TableOptions())
    assert sorted(summary["setting"]) == ["precision=(not recorded)", "precision=bf16"]


def test_duplicate_seed_other_protocol_and_other_options_get_no_silent_average(
    tmp_path: Path,
) -> None:
    root = tmp_path / "r"
    make_run(root, "digits-offline", "l2p", 0, [[90, 0], [80, 70]], stamp="20260101-000000")
    make_run(root, "digits-offline", "l2p", 0, [[90, 0], [80, 60]], stamp="20260102-000000")
    make_run(root, "digits-offline", "l2p", 1, [[90, 0], [80, 80]])
    make_run(root, "digits-offline", "l2p", 2, [[50, 0], [50, 50]], protocol_version=0)
    make_run(root, "digits-offline", "l2p", 3, [[60, 0], [60, 60]], lr=0.1)
    # a run on another machine: another data path, another eval batch size: same protocol
    make_run(root, "digits-offline", "l2p", 4, [[90, 0], [90, 90]], eval_batch_size=8,
             stamp="20260103-000000", data_dir="/elsewhere")  # fmt: skip
    summary = summarise(load_runs([root]), TableOptions())
    by_setting = {(r.setting, r.protocol): r for r in summary.itertuples()}
    assert set(by_setting) == {("lr=0.01", "1"), ("lr=0.1", "1"), ("", "0")}
    main_row = by_setting[("lr=0.01", "1")]
    # seeds 0 (the newer run: FAA 70), 1 (FAA 80) and 4 (FAA 90); the older seed 0 is left out
    assert main_row.seeds == 3 and main_row.faa_mean == pytest.approx(80.0)
    assert main_row.not_averaged == "1 duplicate seed"
    assert by_setting[("", "0")].faa_mean == pytest.approx(50.0)
    table = main_table(summary, assign_rows(load_runs([root]),
                                                          TableOptions()),
                              TableOptions())  # fmt: skip
    assert "protocol" in table.columns and "setting" in table.columns
    assert any(cell.text == "v0 (old)" for row in table.rows for cell in row)


def test_unreadable_run_is_shown_not_fatal(results: Path) -> None:
    broken = results / "digits-offline" / "l2p" / "vit-tiny-random_seed7_x"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    runs = assign_rows(load_runs([results]), TableOptions())
    row = runs[runs["path"] == str(broken)].iloc[0]
    assert row["state"] == "unreadable" and not row["averaged"]
    assert row["strategy"] == "l2p" and row["backbone"] == "vit-tiny-random"


def test_filters_sort_and_metrics(results: Path) -> None:
    options = TableOptions(metrics=("faa",), sort="faa", descending=False)
    request = TableRequest(paths=[results], filters={"scenario": ["digits*"]}, options=options)
    table = build_tables(request)[0]
    assert table.columns == ["scenario", "backbone", "strategy", "seeds", "FAA ↑", "not averaged"]
    assert [row[2].text for row in table.rows] == ["seq-ft", "l2p"]
    with pytest.raises(UsageError, match="no run matches --strategy"):
        filter_runs(load_runs([results]), {"strategy": ["nope"]})


def test_per_task_table(results: Path) -> None:
    request = TableRequest(paths=[results], per_task=True)
    per_task = build_tables(request)[1]
    rows = {row[2].text + row[0].text: [c.text for c in row] for row in per_task.rows}
    # digits l2p: average accuracy on seen tasks after task 1: 90, 92, 88 -> 90 ± 2
    assert rows["l2pdigits-offline"][-2:] == ["90.00 ± 2.00", "76.00 ± 1.73"]
    # fewrel l2p: seen-class accuracy (CRE): 80, 90 -> 85 ± 7.07, then 67.5, 77.5
    assert rows["l2pfewrel-offline"][-2:] == ["85.00 ± 7.07", "72.50 ± 7.07"]


def _strip_math(text: str) -> str:
    return re.sub(r"\$[^$]*\$", "", text)


def _check_latex(text: str) -> None:
    """What would stop pdflatex: unbalanced braces or environments, unescaped specials,
    rows whose cell count differs from the column spec."""
    unescaped = re.sub(r"\\[{}&%$#_]", "", text)
    depth = 0
    for char in unescaped:
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert depth >= 0, "closing brace without an opening one"
    assert depth == 0, "unbalanced braces"
    environments: list[str] = []
    for kind, name in re.findall(r"\\(begin|end)\{(\w+)\}", text):
        if kind == "begin":
            environments.append(name)
        else:
            assert environments and environments.pop() == name, f"\\end{{{name}}} unmatched"
    assert not environments, f"unclosed environments {environments}"
    body = [line for line in text.splitlines() if not line.startswith("%")]
    for line in body:
        plain = _strip_math(re.sub(r"\\[&%$#_{}]", "", line))
        assert not re.search(r"[%#_^~]", plain), f"unescaped special character in {line!r}"
        assert "±" not in line and "—" not in line and "Δ" not in line, line
    spec = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", text).group(1)
    rows = [line for line in body if line.endswith("\\\\")]
    for row in rows:
        assert len(re.findall(r"(?<!\\)&", row)) == len(spec) - 1, row


def test_latex_is_balanced_and_escaped(results: Path) -> None:
    # A strategy given as file.py:Class_Name and a setting with special characters
    for seed, tag in enumerate(["a&b_%#", "x^y~z$"]):
        make_run(results, "digits-offline", "my_methods.py:Probe_v2", seed, [[60, 0], [50, 40]],
                 tag=tag)  # fmt: skip
    request = TableRequest(paths=[results], per_task=True, include_incomplete=True)
    text = render(build_tables(request), "latex")
    for part in text.split("% requires")[1:]:
        _check_latex("% requires" + part)
    assert "\\begin{tabular}" in text and "\\toprule" in text and "\\bottomrule" in text
    assert "Probe\\_v2" in text and "\\textbf{76.00 $\\pm$ 1.73}" in text
    assert "tag=a\\&b\\_\\%\\#" in text


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_latex_compiles(results: Path, tmp_path: Path) -> None:
    text = render(build_tables(TableRequest(paths=[results])), "latex")
    document = tmp_path / "table.tex"
    document.write_text(
        "\\documentclass{article}\\usepackage{booktabs}\\usepackage[utf8]{inputenc}"
        f"\\begin{{document}}\n{text}\\end{{document}}\n"
    )
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", document.name],
                          cwd=tmp_path, capture_output=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout.decode(errors="replace")[-2000:]


def test_csv_and_json(results: Path) -> None:
    built = build_tables(TableRequest(paths=[results]))
    rows = list(csv.DictReader(io.StringIO(render(built, "csv"))))
    assert [r["strategy"] for r in rows] == ["l2p", "seq-ft", "l2p"]
    assert float(rows[0]["faa_mean"]) == pytest.approx(76.0)
    assert rows[0]["seen_mean"] == "" and rows[1]["not_averaged"] == "1 failed"
    payload = json.loads(render(built, "json"))
    first = payload["summary"]["rows"][0]
    assert first["faa_std"] == pytest.approx(statistics.stdev([75, 78, 75]))
    assert first["seen_mean"] is None and first["faa_best"] is True
    with pytest.raises(UsageError, match="csv writes one table"):
        request = TableRequest(paths=[results], per_task=True, include_incomplete=True)
        render(build_tables(request), "csv")
    with pytest.raises(UsageError, match="unknown format"):
        render(built, "xlsx")


def test_reference_beside_ours_marks_protocol_differences(tmp_path: Path) -> None:
    root = tmp_path / "r"
    cre = {"backbone": "bert-base-uncased", "counts": [10] * 10}
    last = [[80.0] * 10 for _ in range(10)]
    make_run(root, "fewrel", "l2p", 0, last, **cre)  # the paper's protocol: 10 tasks, BERT
    make_run(root, "fewrel-offline", "l2p", 0, [[90, 0], [60, 50]], backbone="minilm-l6")
    request = TableRequest(paths=[root], reference=True)
    comparison = build_tables(request)[1].data
    l2p = comparison[comparison["strategy"] == "l2p"].set_index("scenario")
    assert l2p.loc["fewrel", "published"] == 44.6
    assert l2p.loc["fewrel", "difference"] == pytest.approx(80.0 - 44.6)
    assert l2p.loc["fewrel", "note"] == "same protocol"
    assert not l2p.loc["fewrel", "protocol_differs"]
    note = l2p.loc["fewrel-offline", "note"]
    assert note.startswith("protocol differs: scenario fewrel-offline vs fewrel; 2 vs 10 tasks")
    assert "backbone minilm-l6 vs bert-base-uncased" in note
    # published-only rows: the paper's methods we did not run, without a difference
    only = comparison[comparison["seeds"] == 0]
    assert {"wave-cre", "hide-prompt", "crl", "rp-cre"} <= set(only["strategy"])
    assert only["difference"].isna().all()
    # TACRED / vision numbers are not shown: no run of ours in those families
    assert set(comparison["paper_scenario"]) == {"fewrel"}


def test_reference_backbone_family_is_a_caveat_not_a_difference(tmp_path: Path) -> None:
    make_run(tmp_path, "split-cifar100", "l2p", 0, [[85.0] * 10] * 10, backbone="vit-b16-in21k")
    comparison = build_tables(TableRequest(paths=[tmp_path], reference=True))[1]
    row = comparison.data[comparison.data["seeds"] > 0].iloc[0]
    assert row["published"] == 83.83 and row["difference"] == pytest.approx(85.0 - 83.83)
    assert row["note"] == "same protocol; paper's vit-b16 weights not recorded"
    assert not row["protocol_differs"]


def test_reference_files_hold_the_published_numbers() -> None:
    reference = load_reference(REPO / "results" / "reference")
    final = reference[(reference["task"] == reference["tasks"]) & (reference["table"] != "Table 4")]
    values = {(r.file.split("_")[0], r.scenario, r.method): r.value for r in final.itertuples()}
    assert values[("wave-cre", "fewrel", "WAVE-CRE")] == 85.0
    assert values[("wave-cre", "tacred", "RP-CRE")] == 72.4
    assert values[("mammoth-targets", "split-cifar100", "DualPrompt")] == 86.51
    assert values[("coda-prompt", "imagenet-r", "CODA-P")] == 75.45
    wave = reference[reference["file"] == "wave-cre_2412.08285.csv"]
    assert (wave["table"] == "Table 1").sum() == 180  # 2 datasets x 9 methods x 10 tasks


def test_bad_reference_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "paper.csv").write_text("source,scenario,value\nX,fewrel,1\n")
    with pytest.raises(UsageError, match="missing reference column"):
        load_reference(tmp_path)


def test_input_errors_are_usage_errors(tmp_path: Path, results: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not a results folder"):
        find_run_folders([tmp_path / "empty"])
    with pytest.raises(UsageError, match="does not exist"):
        find_run_folders([tmp_path / "missing"])
    with pytest.raises(UsageError, match="unknown sort column"):
        TableOptions(sort="accuracy")
    with pytest.raises(UsageError, match="unknown metric"):
        TableOptions(metrics=("faa", "bwt"))
    for argv in (["table", str(tmp_path / "empty")], ["table", str(results), "-f", "xls"],
                 ["table", str(results), "--group-by", "seed"]):  # fmt: skip
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert error.startswith("clbench: error: ") and error.count("\n") == 1


def test_table_command_imports_no_torch(results: Path) -> None:
    code = (
        "import sys; from clbench.cli import main; "
        f"assert main(['table', {str(results)!r}, '--per-task']) == 0; "
        "heavy = [m for m in ('torch', 'avalanche', 'matplotlib') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| digits-offline |" in done.stdout


def test_task_identity_and_time_columns(tmp_path: Path) -> None:
    # hide-prompt-like runs report task-identity accuracy per test experience after each
    # task (None for tasks not learnt yet); the table averages the last row's seen tasks
    for seed, identity in ((0, [90.0, 70.0]), (1, [80.0, 60.0])):
        run = make_run(tmp_path, "fewrel-offline", "hide-prompt", seed, [[90, 0], [80, 70]])
        progress = json.loads((run / "progress.json").read_text())
        progress[0]["extra"] = {"task_identity_accuracy": [100.0, None]}
        progress[1]["extra"] = {"task_identity_accuracy": identity}
        (run / "progress.json").write_text(json.dumps(progress))
    make_run(tmp_path, "fewrel-offline", "l2p", 0, [[90, 0], [60, 70]])
    runs = load_runs([tmp_path])
    hide = runs[runs["strategy"] == "hide-prompt"].sort_values("seed")
    assert hide["tii"].tolist() == [80.0, 70.0]
    assert runs[runs["strategy"] == "l2p"]["tii"].isna().all()
    # make_run's files say 1 s of training and 0.1 s of evaluation per task
    assert runs["minutes"].tolist() == pytest.approx([2.2 / 60] * 3)

    def table(**options: object) -> str:
        request = TableRequest(paths=[tmp_path], options=TableOptions(**options))
        return render(build_tables(request), "markdown")

    text = table(metrics=("faa", "tii", "minutes"))
    hide_row = next(line for line in text.splitlines() if "hide-prompt" in line)
    assert "75.00 ± 7.07" in hide_row
    assert "TII ↑" in text and "Time (min) ↓" in text
    # shown by default once a strategy reports it
    assert "TII ↑" in table()


def test_family_and_protocol_come_from_config_not_from_the_name(tmp_path: Path) -> None:
    # A relation-extraction scenario the tables have never heard of gets the Seen column
    # and is compared with the published numbers of the protocol it declares.
    config = {
        "protocol_version": 1, "strategy": "l2p", "scenario": "my-relations", "backbone": "b",
        "seed": 0, "strategy_options": {}, "scenario_options": {}, "backbone_options": {},
    }  # fmt: skip
    write_run_folder(tmp_path / "my-relations" / "l2p" / "b_seed0_x", config,
                     [[90, 0], [60, 70]], [50, 150], family="relation-extraction",
                     protocol="fewrel")  # fmt: skip
    built = build_tables(TableRequest(paths=[tmp_path], reference=True))
    assert "Seen ↑" in built[0].columns
    comparison = built[1].data
    ours = comparison[comparison["seeds"] > 0].iloc[0]
    assert ours["scenario"] == "my-relations" and ours["paper_scenario"] == "fewrel"
    assert ours["strategy"] == "l2p" and ours["metric"] == "seen"
    assert ours["ours_mean"] == pytest.approx(67.5)  # (0.6 * 50 + 0.7 * 150) / 200


def test_a_run_made_before_the_scenario_keys_reads_as_vision_under_its_own_name(
    tmp_path: Path,
) -> None:
    config = {
        "protocol_version": 1, "strategy": "l2p", "scenario": "fewrel-offline", "backbone": "b",
        "seed": 0, "strategy_options": {}, "scenario_options": {}, "backbone_options": {},
    }  # fmt: skip
    folder = write_run_folder(tmp_path / "old", config, [[90, 0], [60, 70]], [50, 150])
    assert "scenario_family" not in json.loads((folder / "config.json").read_text())
    runs = load_runs([tmp_path])
    assert runs.loc[0, "family"] == "vision"
    assert runs.loc[0, "scenario_protocol"] == "fewrel-offline"
    built = build_tables(TableRequest(paths=[tmp_path], reference=True))
    assert "Seen ↑" not in built[0].columns
    assert built[1].data.empty  # no published numbers under the name "fewrel-offline"


def test_run_folder_and_reporting_modules_import_no_torch() -> None:
    modules = [
        "clbench.results", "clbench.results.folder", "clbench.reporting",
        "clbench.reporting.runs", "clbench.reporting.summary", "clbench.reporting.reference",
        "clbench.reporting.display", "clbench.reporting.render", "clbench.reporting.plots",
        "clbench.reporting.report",
    ]  # fmt: skip
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
        "heavy = [m for m in ('torch', 'avalanche', 'matplotlib') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
