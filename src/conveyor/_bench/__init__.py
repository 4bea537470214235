"""``conveyor bench``: one face-detection workload run under each concurrency design.

:mod:`._workload` is the work per item, :mod:`._designs` one function per design,
:mod:`._measure` the clocks and counters, :mod:`._report` the table and JSON,
:mod:`._plot` the picture; :mod:`._suite` runs them all in order.
"""
