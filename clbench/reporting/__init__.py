"""Tables, figures and report pages from run folders, with the papers' numbers beside ours.

Everything here is a pure function of the run folders (read through
:mod:`clbench.results.folder`) and imports neither torch nor avalanche: building a table
from thousands of runs reads a few kilobytes of JSON per run and should take about as
long as starting Python. One module per job:

runs       find, read, load and filter run folders: one pandas row per run
summary    runs grouped into rows (mean ± std over seeds), per-task curves
reference  the published numbers, matched on the scenario's paper protocol
display    DisplayTable builders; ``build_tables`` makes every table ``clbench table``
           asks for
render     Markdown, LaTeX, CSV, JSON, HTML
plots      figures (matplotlib, imported only when drawing)
report     one HTML or Markdown page of tables and figures
"""
