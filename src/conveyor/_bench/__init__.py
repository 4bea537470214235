"""``conveyor bench``: one face-detection workload run under each concurrency design.

:mod:`._workload` is the work per item; :mod:`._designs` the designs in one process and
:mod:`._programs` those of several programs (with :mod:`._client`, a client of
``conveyor serve``, and :mod:`._hog`, the unrelated CPU-bound program); :mod:`._measure`
the clocks and counters; :mod:`._report` the table and JSON; :mod:`._plot` the picture;
:mod:`._suite` runs them all in order.
"""
