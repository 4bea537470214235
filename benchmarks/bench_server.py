"""Device server benchmark (issue 4): what a request pays for going through ``conveyor serve``.

Three measurements, all in one run, printed as numbers and ratios:

1. **Added latency.** face_landmark (a 192x192x3 float32 input) on the CPU, one request at a
   time: (a) ``Runner.run`` called directly in this process, (b) ``DeviceClient.infer`` to a
   ``conveyor serve`` process, (c) the same request to this program's own device worker
   (the child process a pipeline's ``infer`` stage starts), (d) the same request to a device
   worker *thread* in this process (a thread that owns its own interpreter and takes
   requests from a queue, the in-process design a program would write by hand), and, as
   the floor that any design with a separate process pays on this machine, (e) a bare
   round trip: copy into shared memory, 48 bytes on a socket to a one-thread process that
   runs the model on it, 48 bytes back. Blocks of the five alternate so that drift in the
   machine's speed hits all. The p50 difference of (b) to (a) is the added latency (target
   <= 50 us); (b) to (d) is the same against an in-process worker thread; (b) to (c) is
   what sharing the device costs over a private worker process.
2. **Throughput, one client.** The same model back to back: (a) direct, (b) one client
   keeping ``--depth`` requests in flight. Target: (b) >= 0.95x (a).
3. **Four clients, one device.** A simulated Edge TPU (``sim-edgetpu``: device-bound, it
   sleeps instead of computing) served to one client process, then to four at once, each
   keeping requests in flight. Target: aggregate >= 0.95x one client's rate, and each
   client's share of device time (as the server accounts it) within 10% of the mean.

    PYTHONPATH=src python3 benchmarks/bench_server.py
    PYTHONPATH=src python3 benchmarks/bench_server.py --quick
    PYTHONPATH=src python3 benchmarks/bench_server.py --json   # also writes bench_server.json

Not a test: it reports what it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
LATENCY_TARGET_US = 50.0
THROUGHPUT_TARGET = 0.95
SHARE_TOLERANCE = 0.10


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


@contextmanager
def serve(device: str, model: str, *extra: str) -> Iterator[Path]:
    """A ``conveyor serve`` process on a private socket; stopped with SIGTERM after."""
    tmp = Path(tempfile.mkdtemp(prefix="cvb-"))
    path = tmp / "s.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "serve", "--socket", str(path), "--device", device,
         "--model", model, "--log-level", "warning", *extra],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=_env(), text=True,
    )
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(60) or not proc.stdout.readline():
            raise SystemExit("conveyor serve did not start")
        sel.close()
        yield path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()


def _rt(realtime: int) -> list[str]:
    return ["--realtime", str(realtime)] if realtime else []


def _pct(values: list[int], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) / 1e3


def _floor_child(sock: socket.socket, device: str, model: str, seg: Any, realtime: int) -> None:
    """The hand-written floor: one thread, blocking receive, run on the shared tensors."""
    from conveyor._runtime._sched import set_realtime
    from conveyor.backends import open_device

    set_realtime(realtime)
    runner = open_device(device).load(model)
    ins = [seg.array(0, s.shape, s.dtype) for s in runner.inputs]
    outs = [seg.array((1 << 20) + 8192 * i, s.shape, s.dtype)
            for i, s in enumerate(runner.outputs)]
    while sock.recv(64):
        for dst, src in zip(outs, runner.run(ins)):
            np.copyto(dst, src)
        sock.send(b"r" * 48)


@contextmanager
def _thread_worker(device: str, model: str, realtime: int) -> Iterator[Any]:
    """An in-process device worker thread: it owns an interpreter of its own and runs the
    inputs it takes from a queue, replying on another. Yields the round trip function."""
    from conveyor._runtime._sched import realtime_thread
    from conveyor.backends import open_device

    requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
    replies: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def loop() -> None:
        with realtime_thread(realtime):
            runner = open_device(device).load(model)
            try:
                while (item := requests.get()) is not None:
                    replies.put(runner.run([item]))
            finally:
                runner.close()

    thread = threading.Thread(target=loop, name="thread-worker", daemon=True)
    thread.start()

    def trip(x: Any) -> Any:
        requests.put(x)
        return replies.get()

    try:
        yield trip
    finally:
        requests.put(None)
        thread.join()


def latency(device: str, model: str, rounds: int, block: int, realtime: int) -> dict[str, Any]:
    """Alternating blocks of direct runs, the hand-written floor, round trips to an
    in-process worker thread, to a private device worker and to ``conveyor serve``; times
    in microseconds. ``realtime``: the SCHED_FIFO priority of the thread that runs the
    model in each (this one for direct runs, the worker thread, the floor's, the worker's
    and the server's device thread)."""
    from conveyor import connect
    from conveyor._device._worker import DeviceWorker
    from conveyor._runtime._sched import realtime_thread
    from conveyor._shm import Segment
    from conveyor.backends import open_device

    # The floor's process is forked first, before this one starts any runtime threads.
    seg = Segment.create(2 << 20)
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        mine.close()
        try:
            _floor_child(theirs, device, model, seg, realtime)
        finally:
            os._exit(0)
    theirs.close()
    runner = open_device(device).load(model)
    shape = runner.inputs[0].shape
    img = np.random.default_rng(0).random(shape, dtype=np.float32)
    floor_in = seg.array(0, shape, np.dtype(np.float32))
    floor_outs = [seg.array((1 << 20) + 8192 * i, s.shape, s.dtype)
                  for i, s in enumerate(runner.outputs)]

    def floor_trip() -> None:
        np.copyto(floor_in, img)
        mine.send(b"q" * 48)
        mine.recv(64)
        for out in floor_outs:
            out.copy()

    direct: list[int] = []
    floor: list[int] = []
    server: list[int] = []
    private: list[int] = []
    in_thread: list[int] = []
    # The same client set-up as connect() gives: the waiting thread reads its own reply.
    worker = DeviceWorker(device, [model], realtime=realtime, reader=False)
    try:
        with serve(device, model, *_rt(realtime)) as path, connect(path) as client, \
                _thread_worker(device, model, realtime) as thread_trip:
            trips = ((floor_trip, floor), (lambda: client.infer(model, img), server),
                     (lambda: worker.client.infer(model, img), private),
                     (lambda: thread_trip(img), in_thread))
            for _ in range(50):  # warm all five up
                runner.run([img])
                for fn, _out in trips:
                    fn()
            for _ in range(rounds):
                with realtime_thread(realtime):
                    for _ in range(block):
                        t0 = time.perf_counter_ns()
                        runner.run([img])
                        direct.append(time.perf_counter_ns() - t0)
                for fn, out in trips:
                    for _ in range(block):
                        t0 = time.perf_counter_ns()
                        fn()
                        out.append(time.perf_counter_ns() - t0)
    finally:
        worker.close()
        mine.close()
        os.waitpid(pid, 0)
        seg.close()
        runner.close()
    d50, f50, s50, w50, t50 = (_pct(direct, 50), _pct(floor, 50), _pct(server, 50),
                               _pct(private, 50), _pct(in_thread, 50))
    return {
        "device": device, "model": model, "input": list(shape), "samples": len(direct),
        "direct_p50_us": round(d50, 1), "direct_p99_us": round(_pct(direct, 99), 1),
        "floor_p50_us": round(f50, 1), "floor_added_p50_us": round(f50 - d50, 1),
        "server_p50_us": round(s50, 1), "server_p99_us": round(_pct(server, 99), 1),
        "added_p50_us": round(s50 - d50, 1), "target_us": LATENCY_TARGET_US,
        "private_worker_p50_us": round(w50, 1),
        "private_worker_p99_us": round(_pct(private, 99), 1),
        "server_over_private_p50_us": round(s50 - w50, 1),
        "thread_worker_p50_us": round(t50, 1),
        "thread_worker_p99_us": round(_pct(in_thread, 99), 1),
        "server_over_thread_worker_p50_us": round(s50 - t50, 1),
    }


def throughput(device: str, model: str, seconds: float, depth: int, realtime: int
               ) -> dict[str, Any]:
    """Items/s of direct back-to-back runs and of one pipelined client, alternating."""
    from conveyor import connect
    from conveyor._runtime._sched import realtime_thread
    from conveyor.backends import open_device

    runner = open_device(device).load(model)
    img = np.random.default_rng(0).random(runner.inputs[0].shape, dtype=np.float32)

    def run_direct(t: float) -> float:
        n, end = 0, time.perf_counter() + t
        with realtime_thread(realtime):
            while time.perf_counter() < end:
                runner.run([img])
                n += 1
        return n / t

    with serve(device, model, *_rt(realtime)) as path, connect(path) as client:

        def run_client(t: float) -> float:
            futs = [client.submit(model, img) for _ in range(depth)]
            n, start = 0, time.perf_counter()
            end = start + t
            while time.perf_counter() < end:
                futs.pop(0).result()
                futs.append(client.submit(model, img))
                n += 1
            for f in futs:
                f.result()
            return n / (time.perf_counter() - start)

        run_direct(0.3)
        run_client(0.3)
        direct, server = [], []
        for _ in range(3):
            direct.append(run_direct(seconds / 3))
            server.append(run_client(seconds / 3))
    runner.close()
    d, s = float(np.median(direct)), float(np.median(server))
    return {"device": device, "model": model, "depth": depth, "direct_per_s": round(d, 1),
            "server_per_s": round(s, 1), "ratio": round(s / d, 3),
            "target": THROUGHPUT_TARGET}


CLIENT = """
import sys, time, numpy as np, conveyor
path, model, seconds, depth = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
c = conveyor.connect(path, name=sys.argv[5])
info = c.model_info(model)
img = np.zeros(info.inputs[0].shape, info.inputs[0].dtype)
for _ in range(20):
    c.infer(model, img)
print("ready", flush=True)
sys.stdin.readline()
futs = [c.submit(model, img) for _ in range(depth)]
n, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    futs.pop(0).result()
    futs.append(c.submit(model, img))
    n += 1
rate = n / (time.perf_counter() - start)
for f in futs:
    f.result()
print(rate, flush=True)
sys.stdin.readline()  # stay connected until the server's accounting has been read
c.close()
"""


def _clients(path: Path, model: str, n: int, seconds: float, depth: int
             ) -> tuple[list[float], dict[str, float]]:
    """Rates of ``n`` client processes run at once, and the device time the server
    accounted to each while they ran."""
    from conveyor._device._client import query_status

    procs = [subprocess.Popen([sys.executable, "-c", CLIENT, str(path), model, str(seconds),
                               str(depth), f"c{i}"], env=_env(), text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for i in range(n)]

    def tell(line: str) -> None:
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(line)
            p.stdin.flush()

    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise SystemExit("a client did not start")
        before = {c["name"]: c["device_s"] for c in query_status(path)["clients"]}
        tell("go\n")
        rates = []
        for p in procs:
            assert p.stdout is not None
            rates.append(float(p.stdout.readline()))
        after = {c["name"]: c["device_s"] for c in query_status(path)["clients"]}
        tell("bye\n")
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
            p.wait(30)
            if p.stdout is not None:
                p.stdout.close()
    return rates, {k: after[k] - v for k, v in before.items()}


def shared(device: str, model: str, seconds: float, depth: int, realtime: int
           ) -> dict[str, Any]:
    """One client alone, then four at once, on one simulated device."""
    with serve(device, model, *_rt(realtime)) as path:
        (one,), _ = _clients(path, model, 1, seconds, depth)
        rates, device_s = _clients(path, model, 4, seconds, depth)
    total = sum(rates)
    mean = sum(device_s.values()) / len(device_s)
    spread = max(abs(v - mean) / mean for v in device_s.values())
    return {
        "device": device, "model": model, "depth": depth,
        "one_client_per_s": round(one, 1), "four_clients_per_s": round(total, 1),
        "aggregate_ratio": round(total / one, 3), "per_client_per_s": [round(r, 1) for r in rates],
        "device_s_by_client": {k: round(v, 4) for k, v in sorted(device_s.items())},
        "max_share_deviation": round(spread, 4), "target_ratio": THROUGHPUT_TARGET,
        "target_share_deviation": SHARE_TOLERANCE,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--json", action="store_true",
                        help="also write the results to bench_server.json next to this file")
    parser.add_argument("--depth", type=int, default=4, help="requests in flight per client")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cpu:1"],
                        help="CPU device specs for the latency and throughput parts "
                        "(default: cpu, all threads; cpu:1, one thread, leaving a core free "
                        "as an accelerator would)")
    parser.add_argument("--no-realtime", action="store_true",
                        help="every thread that runs the model at normal priority (default: "
                        "SCHED_FIFO 1 where the OS allows it, for the server's device thread, "
                        "the floor's and the direct runs alike)")
    args = parser.parse_args()
    scale = 0.3 if args.quick else 1.0
    from conveyor._runtime._sched import probe_realtime

    realtime = 0 if args.no_realtime else 1
    scheduling = probe_realtime(realtime)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "device_threads": scheduling},
    }
    print(f"threads that run the model: {scheduling}")
    results["latency"], results["throughput"] = [], []
    for device in args.devices:
        lat = latency(device, "face_landmark", rounds=max(2, int(10 * scale)), block=200,
                      realtime=realtime)
        results["latency"].append(lat)
        met = "met" if lat["added_p50_us"] <= LATENCY_TARGET_US else "MISSED"
        print(f"latency  face_landmark {lat['input']} float32 on {device}, "
              f"{lat['samples']} requests each, one at a time:")
        print(f"  direct Runner.run   p50 {lat['direct_p50_us']:8.1f} us  p99 "
              f"{lat['direct_p99_us']:8.1f} us")
        print(f"  via conveyor serve  p50 {lat['server_p50_us']:8.1f} us  p99 "
              f"{lat['server_p99_us']:8.1f} us")
        over = lat["server_over_thread_worker_p50_us"]
        print(f"  in-process worker thread p50 {lat['thread_worker_p50_us']:8.1f} us  p99 "
              f"{lat['thread_worker_p99_us']:8.1f} us  (the server adds {over:+.1f} us over "
              f"it: target <= {LATENCY_TARGET_US:g} us: "
              f"{'met' if over <= LATENCY_TARGET_US else 'MISSED'})")
        print(f"  own device worker   p50 {lat['private_worker_p50_us']:8.1f} us  p99 "
              f"{lat['private_worker_p99_us']:8.1f} us  (the server adds "
              f"{lat['server_over_private_p50_us']:+.1f} us over it)")
        print(f"  floor: a bare shared-memory + socket round trip to a one-thread process "
              f"running the same model adds {lat['floor_added_p50_us']:.1f} us at p50")
        print(f"  added at p50        {lat['added_p50_us']:8.1f} us  (target <= "
              f"{LATENCY_TARGET_US:g} us: {met})")
        thr = throughput(device, "face_landmark", seconds=6 * scale, depth=args.depth,
                         realtime=realtime)
        results["throughput"].append(thr)
        met = "met" if thr["ratio"] >= THROUGHPUT_TARGET else "MISSED"
        print(f"throughput  on {device}, one client with {args.depth} in flight:")
        print(f"  direct {thr['direct_per_s']:.1f}/s, via server {thr['server_per_s']:.1f}/s, "
              f"ratio {thr['ratio']:.3f}x  (target >= {THROUGHPUT_TARGET}: {met})")
    sh = shared("sim-edgetpu", "face_landmark", seconds=4 * scale, depth=args.depth,
                realtime=realtime)
    results["shared"] = sh
    print(f"shared device  {sh['device']} (simulated) {sh['model']}, {args.depth} in flight each:")
    print(f"  one client {sh['one_client_per_s']:.1f}/s, four clients "
          f"{sh['four_clients_per_s']:.1f}/s in all ({sh['per_client_per_s']}), ratio "
          f"{sh['aggregate_ratio']:.3f}x  (target >= {THROUGHPUT_TARGET}: "
          f"{'met' if sh['aggregate_ratio'] >= THROUGHPUT_TARGET else 'MISSED'})")
    print(f"  device time by client {sh['device_s_by_client']}, largest deviation from the "
          f"mean {100 * sh['max_share_deviation']:.1f}%  (target <= "
          f"{100 * SHARE_TOLERANCE:.0f}%: "
          f"{'met' if sh['max_share_deviation'] <= SHARE_TOLERANCE else 'MISSED'})")
    if args.json:
        out = Path(__file__).with_name("bench_server.json")
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
