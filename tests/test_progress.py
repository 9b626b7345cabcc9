"""Progress of the long phases: a line at the start, every 30 s and at the end without a
terminal, a bar with an ETA on one, nothing under --quiet; and real phases (the token
cache, an evaluation pass, a sweep's validation, a download) say what they do."""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
import types

import pytest

from clbench import logs
from clbench import progress as progress_module
from clbench.progress import (
    ERASE_LINE,
    Progress,
    close_all,
    format_duration,
    importing,
    progress,
    track,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def err_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


@pytest.fixture
def quiet():
    logs.set_verbosity(quiet=True)
    yield
    logs.set_verbosity()


@pytest.fixture
def announce_at_once(monkeypatch):
    """Start lines at once instead of after a second: the real phases here are quick."""
    monkeypatch.setattr(progress_module, "ANNOUNCE_AFTER_S", 0.0)


def test_without_a_terminal_a_line_at_start_every_30_seconds_and_at_the_end(capsys):
    clock = FakeClock()
    bar = progress(100, "encoding", unit="sentences", clock=clock, heartbeat=False, tty=False)
    for _ in range(10):  # 10 sentences every 4 s: a line at 32 s, none before
        clock.now += 4
        bar.update(10, detail="loss 0.5")
    bar.finish()
    assert err_lines(capsys) == [
        "encoding (100 sentences) ...",
        "encoding: 80/100 sentences (80%), 32.0s elapsed, 2.5 sentences/s, ETA 8.0s, loss 0.5",
        "encoding: 100 sentences in 40.0s (2.5 sentences/s)",
    ]


def test_periodic_lines_keep_coming_every_30_seconds(capsys):
    clock = FakeClock()
    with progress(None, "loading backbone x", clock=clock, heartbeat=False, tty=False) as bar:
        for _ in range(7):
            clock.now += 15
            bar.tick()  # what the heartbeat thread does
    lines = err_lines(capsys)
    assert lines[0] == "loading backbone x ..."  # at the first tick, 15 s in
    assert lines[1:-1] == [
        "loading backbone x: 30.0s elapsed",
        "loading backbone x: 1m00s elapsed",
        "loading backbone x: 1m30s elapsed",
    ]
    assert lines[-1] == "loading backbone x: done in 1m45s"


def test_a_phase_over_within_a_second_prints_nothing(capsys):
    clock = FakeClock()
    with progress(5, "quick", clock=clock, heartbeat=False, tty=False) as bar:
        clock.now += 0.9
        bar.update(5)
    assert capsys.readouterr().err == ""
    with progress(5, "slower", clock=clock, heartbeat=False, tty=False) as bar:
        clock.now += 0.5
        bar.update(2)
        assert capsys.readouterr().err == ""  # the start line waits a second ...
        clock.now += 0.7
        bar.update(3)
    assert err_lines(capsys) == ["slower (5 items) ...", "slower: 5 items in 1.2s (4.2 items/s)"]


def test_the_imports_header_goes_to_stdout_at_once(monkeypatch, capsys):
    for name in ("avalanche.training", "clbench.runner"):  # as after the imports
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    with importing("clbench run x on y"):  # imported already: nothing to say
        pass
    assert capsys.readouterr() == ("", "")
    monkeypatch.delitem(sys.modules, "clbench.runner")  # as in a fresh process
    with importing("clbench run x on y"):
        pass
    out, err = capsys.readouterr()
    header = "clbench run x on y: importing torch and Avalanche"
    assert out.splitlines()[0] == f"{header} ..."
    assert out.splitlines()[1].startswith(f"{header}: done in")
    assert err == ""


def test_a_terminal_gets_a_bar_with_an_eta_and_the_end_line(capsys):
    clock, terminal = FakeClock(), FakeTerminal()
    bar = progress(50, "evaluating", unit="items", clock=clock, heartbeat=False, stream=terminal)
    assert bar.tty
    for _ in range(2):
        clock.now += 1
        bar.update(10)
    drawn = terminal.getvalue()
    assert "\r" in drawn and "evaluating [########............] 20/50 items (40%)" in drawn
    assert "ETA 3.0s" in drawn and "10.0 items/s" in drawn
    assert capsys.readouterr().err == ""  # no start line under a bar
    bar.finish()
    assert terminal.getvalue().endswith(ERASE_LINE)  # the bar is gone ...
    assert err_lines(capsys) == ["evaluating: 20 items in 2.0s (10.0 items/s)"]  # ... for this


def test_a_log_line_erases_the_bar_first(capsys):
    terminal = FakeTerminal()
    with progress(10, "phase", stream=terminal, heartbeat=False, end_line=False):
        logging.getLogger("clbench.somewhere").info("a line in between")
        assert terminal.getvalue().endswith(ERASE_LINE)
    assert capsys.readouterr().out == "a line in between\n"


def test_an_inner_bar_takes_the_line_until_it_ends():
    terminal = FakeTerminal()
    clock = FakeClock()
    options = dict(stream=terminal, heartbeat=False, clock=clock, end_line=False)
    with progress(4, "outer", **options) as outer:
        with progress(2, "inner", **options):
            clock.now += 1
            outer.update()
            assert "outer [#####" not in terminal.getvalue()  # suspended
        clock.now += 1
        outer.update()
    assert "outer [##########..........] 2/4" in terminal.getvalue()


def test_quiet_draws_and_logs_nothing(quiet, capsys):
    terminal = FakeTerminal()
    for tty in (False, True):
        with progress(3, "phase", stream=terminal, tty=tty) as bar:
            bar.update(3)
        assert not bar.enabled and bar._thread is None
    assert terminal.getvalue() == ""
    assert capsys.readouterr() == ("", "")


def test_the_heartbeat_speaks_during_one_long_step(capsys):
    with progress(None, "one long call", every=0.05, tty=False, announce_after=0.05):
        time.sleep(0.4)
    lines = err_lines(capsys)
    assert lines[0] == "one long call ..." and lines[-1].startswith("one long call: done in")
    assert len(lines) >= 4 and all("elapsed" in line for line in lines[1:-1])
    time.sleep(0.15)
    assert capsys.readouterr().err == ""  # nothing after the end


def test_a_failed_phase_ends_without_an_end_line_and_close_all_stops_the_rest(capsys):
    with pytest.raises(RuntimeError), progress(5, "failing", tty=False, announce_after=0) as bar:
        raise RuntimeError("boom")
    assert err_lines(capsys) == ["failing (5 items) ..."]
    assert bar._thread is not None and not bar._thread.is_alive()
    left_open = progress(5, "left open", tty=False)
    close_all()
    assert left_open._closed and not left_open._thread.is_alive()  # type: ignore[union-attr]
    assert not [t for t in threading.enumerate() if t.name.startswith("clbench-progress")]


def test_track_counts_its_items(announce_at_once, capsys):
    assert list(track(range(4), "tracked", tty=False, unit="things")) == [0, 1, 2, 3]
    lines = err_lines(capsys)
    assert lines[0] == "tracked (4 things) ..." and lines[1].startswith("tracked: 4 things in")


def test_durations_read_short():
    assert [format_duration(s) for s in (4.24, 59.9, 185, 7620, float("nan"))] == [
        "4.2s",
        "59.9s",
        "3m05s",
        "2h07m",
        "?",
    ]


def test_byte_counts_show_as_megabytes(capsys):
    clock = FakeClock()
    bar = Progress(8 << 20, "  downloading", unit="MB", scale=2**20, clock=clock,
                   heartbeat=False, tty=False, start_line=False)  # fmt: skip
    clock.now += 2
    bar.advance_to(8 << 20)
    bar.finish()
    assert err_lines(capsys) == ["  downloading: 8.0 MB in 2.0s (4.0 MB/s)"]


# -- real phases ------------------------------------------------------------------------


def fewrel_like(count: int) -> list[dict]:
    words = "the quick brown fox jumps over the lazy dog near the river bank".split()
    return [
        {"tokens": words, "h": ["fox", "Q1", [[3]]], "t": ["dog", "Q2", [[8]]]}
        for _ in range(count)
    ]


def test_building_the_token_cache_says_so_and_reading_it_does_not(
    minilm, tmp_path, announce_at_once, capsys
):
    from clbench.data.relation_tokens import encode_relation_examples_cached

    examples = fewrel_like(40)
    first = encode_relation_examples_cached(examples, minilm, 16, "digest", cache_dir=tmp_path)
    lines = err_lines(capsys)
    assert lines[0] == f"building the token cache in {tmp_path} (40 sentences) ..."
    assert lines[-1].startswith(f"building the token cache in {tmp_path}: 40 sentences in")
    again = encode_relation_examples_cached(examples, minilm, 16, "digest", cache_dir=tmp_path)
    assert again.from_cache and bool((again.inputs == first.inputs).all())
    assert capsys.readouterr().err == ""


def test_an_evaluation_pass_and_an_epoch_say_what_they_do(tiny_vit, announce_at_once, capsys):
    import clbench
    from clbench.training import EpochProgress, EvalProgress

    scenario = clbench.create_scenario("digits-offline", tiny_vit, seed=0)
    strategy = clbench.create_strategy(
        "seq-ft",
        encoder=tiny_vit,
        scenario=scenario,
        epochs=1,
        plugins=[EpochProgress(), EvalProgress()],
    )
    strategy.train(scenario.benchmark.train_stream[0])
    test = scenario.benchmark.test_stream
    strategy.eval(test[:2])
    items = len(test[0].dataset) + len(test[1].dataset)
    lines = err_lines(capsys)
    train_items = len(scenario.benchmark.train_stream[0].dataset)
    # seq-ft trains on frozen features: a feature pass first
    assert lines[0] == f"computing features ({train_items} items) ..."
    assert lines[1].startswith(f"computing features: {train_items} items in")
    assert lines[2].startswith("  experience 0 epoch 1/1: loss")  # no start line per epoch
    assert lines[3:] == [f"evaluating experiences 0-1 ({items} test items) ..."]
    assert not [t for t in threading.enumerate() if t.name.startswith("clbench-progress")]


def test_validating_a_sweep_says_how_many_points(tmp_path, announce_at_once, capsys):
    from clbench.sweep.command import SweepCommand, plan

    command = SweepCommand(
        strategies=["seq-ft", "l2p"],
        scenarios=["digits-offline"],
        seeds=["0", "1"],
        presets=["quick"],
        device="cpu",
        out=tmp_path,
        status=True,
    )
    assert len(plan(command)[2]) == 4
    lines = err_lines(capsys)
    assert "validating the grid of command line (4 points) ..." in lines
    assert any(
        line.startswith("validating the grid of command line: 4 points in") for line in lines
    )


def test_a_download_reports_each_file(capsys):
    from clbench.data.download import print_progress

    report = print_progress()
    for received in (0, 1 << 20, 2 << 20):
        report(received, 2 << 20)
    report(0, 1 << 20)  # the next file: a bar of its own
    report(1 << 20, 1 << 20)
    lines = err_lines(capsys)
    assert [line.split(" in ")[0] for line in lines] == [
        "  downloading: 2.0 MB",
        "  downloading: 1.0 MB",
    ]
