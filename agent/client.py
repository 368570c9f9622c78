"""What a controller imports to get actions from the agent.

    from agent.client import Policy
    policy = Policy("/run/edge-agent/infer.sock")
    actions = policy(obs)                      # single input, single output
    outputs = policy.infer({"obs": obs})       # by name
    policy.model_version                       # the version that answered the last call

A swap in the daemon is invisible here: the connection stays, the next answer comes from the new
model. If the daemon restarts, the next call reconnects once before raising."""

from __future__ import annotations

import itertools
import json
import socket
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import InferenceError
from agent.serving import wire


class Policy:
    def __init__(self, socket_path: str | Path, timeout: float = 1.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.model_version = ""
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._input_name: str | None = None

    def __enter__(self) -> Policy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _, body, off = self._call(wire.INFER, inputs)
        return {k: v.copy() for k, v in wire.unpack_tensors(body, off).items()}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """For single-input, single-output models."""
        if self._input_name is None:
            spec = self.info()
            if len(spec["inputs"]) != 1 or len(spec["outputs"]) != 1:
                raise InferenceError("policy(x) needs a single-input, single-output model; use infer()")
            self._input_name = spec["inputs"][0]["name"]
        (out,) = self.infer({self._input_name: x}).values()
        return out

    def info(self) -> dict[str, Any]:
        """The active model: version, sha256, backend, inputs and outputs."""
        _, body, off = self._call(wire.INFO, None)
        (n,) = wire._U32.unpack_from(body, off)
        result: dict[str, Any] = json.loads(bytes(body[off + 4 : off + 4 + n]))
        return result

    def _call(self, kind: int, tensors: dict[str, np.ndarray] | None) -> tuple[int, memoryview, int]:
        rid = next(self._ids) & 0xFFFFFFFF
        msg = wire.request(kind, rid, tensors)
        try:
            body = self._roundtrip(msg)
        except (ConnectionError, BrokenPipeError, FileNotFoundError):
            self.close()  # the daemon restarted: one fresh connection, then give up
            body = self._roundtrip(msg)
        rkind, rrid, version, view, off = wire.parse_response(body)
        if rrid != rid:
            self.close()
            raise InferenceError(f"answer to request {rrid} while waiting for {rid}")
        self.model_version = version or self.model_version
        if rkind == wire.ERROR:
            (n,) = wire._U16.unpack_from(view, off)
            raise InferenceError(bytes(view[off + 2 : off + 2 + n]).decode())
        return rkind, view, off

    def _roundtrip(self, msg: bytes) -> bytes:
        sock = self._connect()
        sock.sendall(msg)
        while True:
            frames = wire.split_frames(self._buf)
            if frames:
                return frames[0]
            data = sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the agent closed the connection")
            self._buf += data

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except OSError:
                sock.close()
                raise
            self._sock = sock
            self._buf.clear()
        return self._sock
