"""The swap between two real serving processes (agent.serving.process): the listener and the client
connections move, with a partial request in flight, and the client's connection never breaks."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.client import Policy
from agent.engines.onnxruntime import OnnxRuntimeBackend
from agent.errors import HandOverRefused, RejectedModel, ServingFailed
from agent.serving import wire
from agent.serving.pipe import Identity, TakeCounts
from agent.serving.process import GateEngine, ServingPool, ServingProcess
from scripts.loopback.models import mlp


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[ServingProcess, ServingProcess, socket.socket]]:
    backend = OnnxRuntimeBackend()
    started = []
    for v, seed in (("a", 1), ("b", 2)):
        engine = tmp_path / f"{v}.engine"
        backend.build(mlp(tmp_path / f"{v}.onnx", seed=seed), engine)
        started.append(ServingProcess(backend, engine, Identity(v, f"sha-{v}", backend.name)))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "infer.sock"))
    listener.listen(8)
    started[0].give(listener)
    try:
        yield started[0], started[1], listener
    finally:
        for w in started:
            w.close()
        listener.close()


def _read_frame(sock: socket.socket) -> bytes:
    buf = bytearray()
    while True:
        frames = wire.split_frames(buf)
        if frames:
            return frames[0]
        chunk = sock.recv(1 << 16)
        assert chunk, "the server closed the connection"
        buf += chunk


def test_a_partial_request_and_the_connection_move_to_the_next_process(
    workers: tuple[ServingProcess, ServingProcess, socket.socket], tmp_path: Path
) -> None:
    a, b, _ = workers
    obs = {"obs": np.ones((1, 48), np.float32)}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client, Policy(tmp_path / "infer.sock") as other:
        client.settimeout(5)
        client.connect(str(tmp_path / "infer.sock"))
        client.sendall(wire.request(wire.INFER, 1, obs))
        assert wire.parse_response(_read_frame(client))[2] == "a"
        other(obs["obs"])
        assert other.model_version == "a"
        assert a.stats().clients == 2

        half = wire.request(wire.INFER, 2, obs)
        client.sendall(half[:20])
        time.sleep(0.2)  # a has read them: it holds 20 bytes of a request when the swap comes
        moved = a.hand_over_to(b)
        assert moved.moved == 2
        client.sendall(half[20:])
        kind, rid, version, _, _ = wire.parse_response(_read_frame(client))
        assert (kind, rid, version) == (wire.RESULT, 2, "b")
        other(obs["obs"])
        assert other.model_version == "b"  # the same connection: no reconnect
        assert b.stats().clients == 2 and a.stats().clients == 0

        b.hand_over_to(a)  # a rollback is a hand-over back
        client.sendall(wire.request(wire.INFER, 3, obs))
        assert wire.parse_response(_read_frame(client))[2] == "a"


def test_a_dead_serving_process_is_reported_with_its_signal(
    workers: tuple[ServingProcess, ServingProcess, socket.socket],
) -> None:
    a, _, _ = workers
    os.kill(a.pid, signal.SIGKILL)
    with pytest.raises(ServingFailed, match="killed by signal 9"):
        a.stats()
    assert a.failure() is not None and "signal 9" in str(a.failure())


def test_an_engine_that_does_not_load_fails_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"not an engine")
    with pytest.raises(ServingFailed, match="the engine does not load"):
        ServingProcess(OnnxRuntimeBackend(), bad, Identity("x", "sha-x", "onnxruntime"))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs")
def test_the_serving_process_moves_to_the_reserved_cpu_and_back(
    workers: tuple[ServingProcess, ServingProcess, socket.socket],
) -> None:
    a, _, _ = workers
    serving, rest = min(os.sched_getaffinity(0)), os.sched_getaffinity(0) - {min(os.sched_getaffinity(0))}
    a.serving_priority(0, {serving})
    assert os.sched_getaffinity(a.pid) == {serving}
    assert os.sched_getscheduler(a.pid) == os.SCHED_OTHER  # out of SCHED_IDLE even without SCHED_FIFO
    a.standby_priority(rest)
    assert os.sched_getaffinity(a.pid) == rest and os.sched_getscheduler(a.pid) == os.SCHED_IDLE


def test_a_hand_over_to_a_dead_process_keeps_the_clients_where_they_are(
    workers: tuple[ServingProcess, ServingProcess, socket.socket], tmp_path: Path
) -> None:
    a, b, _ = workers
    with Policy(tmp_path / "infer.sock") as policy:
        x = np.zeros((1, 48), np.float32)
        policy(x)
        os.kill(b.pid, signal.SIGKILL)
        b.proc.join(5)
        with pytest.raises(HandOverRefused, match="did not take the clients"):
            a.hand_over_to(b)
        policy(x)  # the same connection, still answered by a
        assert policy.model_version == "a" and a.stats().clients == 1


def test_a_large_partial_request_moves_too(
    workers: tuple[ServingProcess, ServingProcess, socket.socket], tmp_path: Path
) -> None:
    a, b, _ = workers
    big = wire.request(wire.INFER, 9, {"obs": np.zeros((1000, 48), np.float32)})  # 192 KB
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(str(tmp_path / "infer.sock"))
        client.sendall(big[:150_000])
        time.sleep(0.2)  # a holds 150 KB of it
        assert a.hand_over_to(b).moved == 1
        client.sendall(big[150_000:])
        _kind, rid, version, _, _ = wire.parse_response(_read_frame(client))
        assert (rid, version) == (9, "b")  # answered (an error: the model takes a batch of 1) by b


def test_a_process_that_does_not_answer_is_ended(workers: tuple[ServingProcess, ServingProcess, socket.socket]) -> None:
    _, b, _ = workers
    os.kill(b.pid, signal.SIGSTOP)
    with pytest.raises(ServingFailed, match="did not answer within 0.5 s; ended it"):
        b.request(TakeCounts(), timeout=0.5)
    assert not b.proc.is_alive()  # no late reply can be taken for the next request's


def test_the_pool_closes_every_process_it_started(tmp_path: Path) -> None:
    backend = OnnxRuntimeBackend()
    engine = tmp_path / "a.engine"
    backend.build(mlp(tmp_path / "a.onnx"), engine)
    pool = ServingPool(backend)
    serving = pool.start(engine, Identity("a", "sha-a", backend.name))
    spare = pool.start(engine, Identity("b", "sha-b", backend.name))
    pool.retire(spare)
    pool.retire(spare)  # released twice (an error path after a release): still the one spare
    assert serving.proc.is_alive() and spare.proc.is_alive() and not spare.closed
    assert pool.start(engine, Identity("c", "sha-c", backend.name)) is spare  # it loads the next model
    pool.close()
    assert not serving.proc.is_alive() and not spare.proc.is_alive()


def test_the_gate_runs_in_the_candidates_process(
    workers: tuple[ServingProcess, ServingProcess, socket.socket], tmp_path: Path
) -> None:
    """The daemon loads no engine: the gate's calls run in the candidate's serving process and give
    what the same engine gives here; its latency is timed there; one that serves refuses them."""
    a, b, _ = workers
    feed = {"obs": np.random.default_rng(0).standard_normal((1, 48)).astype(np.float32)}
    local = OnnxRuntimeBackend().load(tmp_path / "b.engine")
    gate = GateEngine(b)
    assert gate.inputs == local.inputs and gate.outputs == local.outputs
    np.testing.assert_array_equal(gate.run(feed)["actions"], local.run(feed)["actions"])
    times = gate.time_calls(feed, 50)
    assert len(times) == 50 and all(0 < t < 1e6 for t in times)
    with pytest.raises(RejectedModel, match="the gate runs before the swap"):
        GateEngine(a).run(feed)  # a holds the listener
    os.kill(b.pid, signal.SIGKILL)
    b.proc.join(5)
    with pytest.raises(RejectedModel, match="serving process failed during the gate: .*SIGKILL"):
        gate.run(feed)
