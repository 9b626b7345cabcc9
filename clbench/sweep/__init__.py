"""Sweeps: a grid of runs (strategies x scenarios x seeds x ...) run, skipped or resumed.

A sweep is a YAML file or a handful of ``clbench sweep`` flags. It is expanded and every
grid point is resolved by :func:`clbench.runner.resolve_run` *before* anything runs, so an
unknown key, strategy, scenario, backbone, preset or option is one error that names every
offending entry. Each point has a fixed folder named by a hash of its resolved options, so
re-running a sweep skips complete runs, resumes incomplete ones from their last finished
experience and starts the rest. Every run is a process of its own.

One module per job, each importing only those before it:

grid      the sweep file (or the flags) read into grid blocks, every problem collected
plan      expansion into resolved runs, run identity, folders
state     a run's state from its folder and lock (``--status``)
jobs      one run in a child process under the run's lock, retried when killed
child     the child process itself (``python -m clbench.sweep.child RUN_DIR``)
progress  the start / done / heartbeat lines
local     the local pool (``--jobs N``)
ray       the Ray backend (``--backend ray``)
command   ``clbench sweep`` itself
"""
