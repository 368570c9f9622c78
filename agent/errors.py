"""The exception tree: every error the agent and `fleet` raise on purpose, in one place. Each
message is one line a user can act on; code catches the narrowest class that fits.

    AgentError                  base of every error raised on purpose
    ├── ConfigError             the configuration is invalid; the message names the key
    ├── ProtocolError           a payload does not follow the wire contract
    │   └── SignatureRejected   an announcement's required signature is missing or wrong
    ├── DaemonNotRunning        nothing answers on the daemon's control socket
    ├── Unreachable             a service (the broker, S3) did not answer or refused us
    ├── Cancelled               work stopped on purpose: the agent is stopping, or a newer model
    │                           superseded this one (a download's .part stays for the next resume)
    ├── BackendUnavailable      the chosen inference backend cannot run on this machine
    ├── ServingFailed           a serving process ended, did not answer, or failed a request
    │   ├── EngineLoadFailed    the engine does not load (the process, if any, is fine)
    │   └── HandOverRefused     the clients stayed where they were: the taker is gone
    ├── InferenceError          (agent.client) the serving process answered a request with an error
    ├── ShareError              fleet engine sharing through S3 failed: a local build follows
    ├── PublishError            (`fleet publish`) a model could not be published
    └── RejectedModel           a candidate failed a pipeline stage: `stage: reason` is what users see,
        ├── FetchError          with the figures recorded beside the rejection
        └── BuildFailed

A programming error (an illegal lifecycle transition, a broken invariant) is not an AgentError:
it is a bug, logged with its traceback."""

from __future__ import annotations

from typing import Any


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration is invalid; the message names the key."""


class ProtocolError(AgentError):
    """A payload does not follow the wire contract."""


class SignatureRejected(ProtocolError):
    """An announcement is unsigned, signed by an unknown key, or the signature does not verify."""


class DaemonNotRunning(AgentError):
    """`agent` commands that need the daemon raise this when its control socket does not answer."""


class Unreachable(AgentError):
    """A service the command needs (the broker, S3) did not answer or refused; the message says
    which and what to check."""


class Cancelled(AgentError):
    """Work stopped on purpose; the message says why ("the agent is stopping", "superseded by v3")."""


class BackendUnavailable(AgentError):
    """The chosen backend (TensorRT, ONNX Runtime) cannot run here; the message says what is missing."""


class ServingFailed(AgentError):
    """A serving process ended, did not answer in time, or could not do what it was asked."""


class EngineLoadFailed(ServingFailed):
    """The engine does not load (its serving process, where there is one, is fine)."""


class HandOverRefused(ServingFailed):
    """The serving process kept its clients: the one meant to take them is gone."""


class InferenceError(AgentError):
    """The daemon answered with an error (bad input, no active model, ...)."""


class ShareError(AgentError):
    """S3 did not answer as fleet engine sharing expects; the caller falls back to a local build."""


class PublishError(AgentError):
    """`fleet publish` could not check, upload or announce a model."""


class DiskFull(AgentError):
    """The state dir's filesystem is full (or below disk_reserve_mb). Not the model's fault: the
    candidate waits, its partial files removed, and is tried again once space returns."""


class RejectedModel(AgentError):
    """A candidate model failed a pipeline stage; the message is the reason users see, and
    `figures` (e.g. every gate check's result) are recorded with the rejection."""

    def __init__(self, stage: str, reason: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason
        self.figures = figures or {}


class FetchError(RejectedModel):
    """The download stage failed (S3, sha256, size, disk space)."""

    def __init__(self, reason: str) -> None:
        super().__init__("download", reason)


class BuildFailed(RejectedModel):
    """No engine could be built from this ONNX file (the backend's parser, a time limit, the memory guard)."""

    def __init__(self, reason: str) -> None:
        super().__init__("build", reason)
