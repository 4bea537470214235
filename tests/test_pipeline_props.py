"""Property tests against the plain loop (the habit pypeln's tests teach)."""

from __future__ import annotations

import stagefns as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conveyor

FUNCS = [sf.double, sf.inc, sf.square]

chains = st.lists(
    st.tuples(st.sampled_from(range(len(FUNCS))), st.sampled_from(["thread", "process"]),
              st.integers(1, 3)),
    min_size=1, max_size=3,
).filter(lambda c: sum(k == "process" for _, k, _ in c) <= 1)


def plain(chain, xs):  # type: ignore[no-untyped-def]
    out = []
    for x in xs:
        for f, _, _ in chain:
            x = FUNCS[f](x)
        out.append(x)
    return out


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chain=chains, maxsize=st.integers(1, 4), xs=st.lists(st.integers(-50, 50), max_size=40),
       ordered=st.booleans())
def test_any_chain_gives_what_a_plain_loop_gives(chain, maxsize, xs, ordered) -> None:  # type: ignore[no-untyped-def]
    stages = [conveyor.stage(FUNCS[f], kind=k, workers=w) for f, k, w in chain]
    with conveyor.Pipeline(*stages, maxsize=maxsize, ordered=ordered) as pipe:
        got = list(pipe.map(xs))
    want = plain(chain, xs)
    assert got == want if ordered else sorted(got) == sorted(want)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(xs=st.lists(st.integers(0, 100), max_size=60), workers=st.integers(1, 4),
       maxsize=st.integers(1, 4), position=st.integers(0, 2), live=st.booleans())
def test_every_item_is_accounted_for_exactly_once(xs, workers, maxsize, position, live) -> None:  # type: ignore[no-untyped-def]
    stages = [conveyor.stage(sf.inc, workers=workers), conveyor.stage(sf.double)]
    stages.insert(position, conveyor.stage(sf.fail_on_multiple_of_7, workers=workers))
    with conveyor.Pipeline(*stages, maxsize=maxsize, on_error="return",
                           drop="oldest" if live else None) as pipe:
        out = list(pipe.map(xs))
        dropped = pipe.stats()["items"]["dropped"]
    assert len(out) + dropped == len(xs)
    assert dropped == pipe.stats()["stages"][stages[0].name]["dropped"]
    assert_stages_balance(pipe)
    errors = [o for o in out if isinstance(o, conveyor.StageError)]
    assert all(e.stage == "fail_on_multiple_of_7" for e in errors)
    indices = [e.index for e in errors]
    assert len(set(indices)) == len(indices)
    if not live:
        assert dropped == 0
        expected_fail = []
        for i, x in enumerate(xs):
            v = x
            for s in stages:
                if s.fn is sf.fail_on_multiple_of_7 and v % 7 == 3:
                    expected_fail.append(i)
                    break
                v = s.fn(v) if s.fn is not sf.fail_on_multiple_of_7 else v + 100  # type: ignore[misc]
        assert indices == expected_fail


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(xs=st.lists(st.integers(0, 30), min_size=1, max_size=25), workers=st.integers(1, 2))
def test_failures_in_process_stages_are_accounted_once(xs, workers) -> None:  # type: ignore[no-untyped-def]
    with conveyor.Pipeline(conveyor.stage(sf.fail_on_multiple_of_7, kind="process",
                                          workers=workers), on_error="return") as pipe:
        out = list(pipe.map(xs))
    assert len(out) == len(xs)
    for x, o in zip(xs, out):
        if x % 7 == 3:
            assert isinstance(o, conveyor.StageError) and isinstance(o.__cause__, sf.Boom)
        else:
            assert o == x + 100


def assert_stages_balance(pipe: conveyor.Pipeline) -> None:
    """Once closed, every item that entered a stage came out, failed, or was cancelled."""
    for name, st_ in pipe.stats()["stages"].items():
        assert st_["in"] == st_["out"] + st_["errors"] + st_["cancelled"], (name, st_)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(["thread", "process"]), min_size=1, max_size=3),
       workers=st.integers(1, 2), maxsize=st.integers(1, 3), stop_at=st.integers(0, 12),
       how=st.sampled_from(["break", "raise", "close"]))
def test_a_run_cut_short_leaves_every_stage_balanced(kinds, workers, maxsize, stop_at,  # type: ignore[no-untyped-def]
                                                     how) -> None:
    """A break, a raised error or close() while items sit in workers (a process worker
    holds two tasks) still accounts for every item a stage took in."""
    stages = [conveyor.stage(sf.inc, kind=k, workers=workers, name=f"s{i}")
              for i, k in enumerate(kinds)]
    if how == "raise":
        stages.append(conveyor.stage(sf.fail_on_multiple_of_7, kind=kinds[0],
                                     workers=workers))
    pipe = conveyor.Pipeline(*stages, maxsize=maxsize)
    with pipe:
        try:
            for i, _ in enumerate(pipe.map(range(7 * len(kinds) + stop_at, 1000))):
                if how == "break" and i >= stop_at:
                    break
                if how == "close" and i >= stop_at:
                    pipe.close()
        except (conveyor.StageError, conveyor.PipelineClosedError):
            pass
    assert_stages_balance(pipe)
