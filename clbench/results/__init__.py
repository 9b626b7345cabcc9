"""One folder per run, written atomically as the run goes: the run-folder format.

Layout of ``<out>/<scenario>/<strategy>/<run-id>/``:

config.json          the resolved configuration (what ``--resume`` re-reads), with the
                     scenario's family, paper protocol and metrics, and which test
                     experiences are evaluated ("evaluate": seen | all; absent: all)
environment.json     versions, device, git commit, host
progress.json        one record per finished experience: accuracy row, correct / counts
                     per test experience (null where not evaluated: the unseen ones
                     under "seen"), train / eval seconds, peak memory, extras
metrics.json         FAA, CAA, FFM, seen-class accuracy (recomputed after each experience)
accuracy_matrix.csv  A[t, i] in %, one row per finished experience, empty where not
                     evaluated
checkpoint.pt        strategy state after the last finished experience
query_cache/         part-NNNN.pt: what each experience added to the query cache (the
                     checkpoint lists the parts it goes with)
status.json          running | interrupted | failed | complete

:class:`RunFolder` (:mod:`clbench.results.folder`) is the only reader and writer of the
JSON and CSV files and imports no torch, so that tables of thousands of runs start as
fast as Python; :mod:`clbench.results.checkpoint` saves and loads ``checkpoint.pt``.
"""

from clbench.results.folder import ExperienceRecord, RunFolder, write_run_folder

__all__ = ["ExperienceRecord", "RunFolder", "write_run_folder"]
