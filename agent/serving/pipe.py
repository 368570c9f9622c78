"""The control pipe between the daemon and one serving process: what each side sends, as typed
messages (pickled by multiprocessing). The daemon sends a request and reads exactly one reply;
a `HandOver` request is followed by the successor's socket (SCM_RIGHTS)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.contract.protocol import TensorSpec

if TYPE_CHECKING:
    from agent.engines import Engine


@dataclass
class Identity:
    """The model a process serves: what the INFO request answers."""

    version: str
    sha256: str
    backend: str
    deploy_config: dict[str, Any] | None = None

    def info(self, engine: Engine) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": self.version,
            "sha256": self.sha256,
            "backend": self.backend,
            "inputs": [t.to_json() for t in engine.inputs],
            "outputs": [t.to_json() for t in engine.outputs],
        }
        if self.deploy_config is not None:
            d["deploy_config"] = self.deploy_config
        return d

    def emptied(self) -> Identity:
        """The same process with no model loaded."""
        return Identity("", "", self.backend)


# -- requests (daemon -> serving process) -----------------------------------------------------------
@dataclass(frozen=True)
class Load:
    """A spare process loads the next model (it must hold no clients)."""

    engine_path: str
    identity: Identity


@dataclass(frozen=True)
class Unload:
    pass


@dataclass(frozen=True)
class TakeCounts:
    """What it served since the last time it was asked."""


@dataclass(frozen=True)
class HandOver:
    """Send the listener and every client to the process whose socket follows."""


@dataclass(frozen=True)
class Run:
    """The gate: outputs for these inputs, on a model that serves no one yet."""

    feeds: list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class Time:
    """The gate: each of `calls` runs of `feed`, timed where the model will serve (µs)."""

    feed: dict[str, np.ndarray]
    calls: int


@dataclass(frozen=True)
class Stop:
    pass


Request = Load | Unload | TakeCounts | HandOver | Run | Time | Stop


# -- replies (serving process -> daemon) ------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    """A model loaded (or none, for an engine-less process): its I/O, which the daemon checks."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


@dataclass(frozen=True)
class Failed:
    """The request could not be done; the process goes on."""

    error: str


@dataclass
class Counts:
    """What a process served since the daemon last asked (the daemon keeps the totals)."""

    requests: int = 0
    errors: int = 0
    nonfinite: int = 0
    samples: list[int] = field(default_factory=list)  # inference µs per answered request
    clients: int = 0


@dataclass(frozen=True)
class HandedOver:
    moved: int  # connections now held by the successor
    counts: Counts  # what this process served until then


@dataclass(frozen=True)
class Unloaded:
    pass


@dataclass(frozen=True)
class Outputs:
    outputs: list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class Times:
    us: list[float]


@dataclass(frozen=True)
class Stopped:
    pass


Reply = Ready | Failed | Counts | HandedOver | Unloaded | Outputs | Times | Stopped
