"""Applications built on conveyor: real programs that keep a device busy.

:mod:`conveyor.apps.faces` is the first: MediaPipe's face detection (BlazeFace, short and
full range) with the optional face-landmark cascade, split into picklable pre-processing and
post-processing steps so that a :class:`conveyor.Pipeline` can run them in worker processes.
"""
