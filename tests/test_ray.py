"""Scale-out on Ray Data: the same pipeline on each Ray actor (a local Ray here)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import raystage

import conveyor

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'conveyor[ray]'")
pytest.importorskip("ray.data", reason="Ray Data needs pandas and pyarrow ('conveyor[ray]')")


@pytest.mark.slow
@pytest.mark.timeout(180)
# Ray warns about its own deprecated settings while it starts; not conveyor's to fix.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_map_batches_runs_a_conveyor_pipeline_per_actor() -> None:
    from conveyor.ray import map_batches

    # The tests' folder added to the caller's path (which may be how conveyor is found).
    path = os.pathsep.join(p for p in (raystage.__file__.rsplit("/", 1)[0],
                                       os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        ds = ray.data.from_items([{"item": i} for i in range(40)])
        out = map_batches(
            ds, "face_detection_short_range", preprocess=raystage.to_tensor,
            postprocess=raystage.top_score, batch_size=8, concurrency=1,
        )
        rows = sorted(out.take_all(), key=lambda r: r["item"])
    finally:
        ray.shutdown()
    runner = conveyor.open_device("cpu").load("face_detection_short_range")
    want = [float(runner.run([raystage.to_tensor(i)])[1].max()) for i in range(40)]
    assert [r["item"] for r in rows] == list(range(40))
    np.testing.assert_allclose([r["output"] for r in rows], want, rtol=1e-5)


def test_a_function_that_pickles_only_by_value_reaches_the_workers() -> None:
    """What a driver script's function is inside a Ray actor (its __main__ is Ray's
    worker): not importable by reference, so the Predictor's pre-processing stage
    carries it by value; here a lambda stands for it, in a local pipeline."""
    from conveyor.ray import _for_workers

    offset = 3
    fn = _for_workers(lambda i: i + offset)
    assert type(fn).__name__ == "_ByValue"
    assert _for_workers(raystage.to_tensor) is raystage.to_tensor  # importable: as is
    with conveyor.Pipeline(conveyor.stage(fn, kind="process", workers=2)) as pipe:
        assert list(pipe.map(range(5))) == [3, 4, 5, 6, 7]


def test_actors_on_a_node_with_several_edge_tpus_take_one_each() -> None:
    """A Predictor given an Edge TPU without a number opens the first one no other
    actor holds (here two simulated devices, in one process, stand for two actors)."""
    from conveyor.ray import Predictor

    first = Predictor("face_detection_short_range", device="sim-edgetpu",
                      preprocess=raystage.to_tensor, postprocess=raystage.top_score)
    second = Predictor("face_detection_short_range", device="sim-edgetpu",
                       preprocess=raystage.to_tensor, postprocess=raystage.top_score)
    try:
        specs = [p.pipeline.stats()["device"]["device"] for p in (first, second)]
        assert specs == ["sim-edgetpu:0", "sim-edgetpu:1"]
        batch = {"item": np.arange(4)}
        assert len(second(batch)["output"]) == 4
    finally:
        first.pipeline.close()
        second.pipeline.close()


def test_a_predictor_takes_infer_s_options() -> None:
    """``device="server:PATH"`` was refused as an unknown device (infer() takes it), and
    ``dequantize`` could not be given: a quantised model's raw integers went to the
    post-processing."""
    from test_server_support import ServeProcess, socket_dir

    from conveyor.ray import Predictor

    batch = {"item": np.arange(3)}
    plain = Predictor("face_detection_short_range_int8", preprocess=raystage.to_tensor,
                      postprocess=raystage.top_score)
    floats = Predictor("face_detection_short_range_int8", preprocess=raystage.to_tensor,
                       postprocess=raystage.top_score, dequantize=True)
    try:
        raw, scores = plain(batch)["output"], floats(batch)["output"]
        assert all(float(r).is_integer() for r in raw)  # int8 values
        assert not all(float(s).is_integer() for s in scores)
    finally:
        plain.pipeline.close()
        floats.pipeline.close()
    with socket_dir() as d, ServeProcess(d / "s.sock") as srv:
        served = Predictor("face_detection_short_range", device=f"server:{srv.path}",
                           preprocess=raystage.to_tensor, postprocess=raystage.top_score)
        try:
            got = served(batch)["output"]
        finally:
            served.pipeline.close()
        with conveyor.connect(srv.path) as watcher:
            status = watcher.status()
    runner = conveyor.open_device("cpu").load("face_detection_short_range")
    want = [float(runner.run([raystage.to_tensor(i)])[1].max()) for i in range(3)]
    np.testing.assert_allclose(list(got), want, rtol=1e-5)
    assert status["totals"]["requests"]["ok"] == 3
