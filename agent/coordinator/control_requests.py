"""The control socket's requests, on the coordinator thread; every one is answered (the CLI waits:
for minutes when a model must load). `agent rollback/activate/pin` are begun here, their model
loaded on the operator thread if it is not loaded already (a stored engine may need rebuilding,
which would hold the coordinator for minutes), and finished here once it serves."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from agent.coordinator.activation import Activation, OperatorJob
from agent.coordinator.announcements import Announcements
from agent.coordinator.local_deploy import LocalDeploy
from agent.coordinator.store import ModelRecord
from agent.errors import AgentError
from agent.serving.server import InferenceServer, ServedModel
from agent.system.control import (
    ControlRequest,
    DebugHang,
    DeployFile,
    OperatorCommand,
    Reply,
    Request,
    StatusQuery,
    Unpin,
    refused,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatorLoaded:
    """The operator thread loaded `job`'s model (`served`), or failed to (`error`)."""

    job: OperatorJob
    served: ServedModel | None
    error: str
    reply: queue.Queue[Reply]


class ControlRequests:
    def __init__(
        self,
        *,
        activation: Activation,
        announcements: Announcements,
        local_deploy: LocalDeploy,
        server: InferenceServer,
        status: Callable[[], dict[str, Any]],
        post: Callable[[OperatorLoaded], None],
    ) -> None:
        self.activation = activation
        self.announcements = announcements
        self.local_deploy = local_deploy
        self.server = server
        self.status = status
        self.post = post
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="operator")

    def handle(self, event: ControlRequest[Request]) -> None:
        if isinstance(event.request, DebugHang):
            event.reply.put({"ok": True})
            log.warning("debug-hang: blocking the coordinator for %.0f s", event.request.seconds)
            time.sleep(event.request.seconds)
            return
        try:
            reply = self._answer(event.request, event.reply)
        except AgentError as err:
            reply = refused(str(err))
        except Exception as err:
            log.exception("control request %s failed", type(event.request).__name__)
            reply = refused(f"internal error: {type(err).__name__}: {err}")
        if reply is not None:
            event.reply.put(reply)

    def _answer(self, request: Request, reply: queue.Queue[Reply]) -> Reply | None:
        """The reply, or None when it comes later (a model loading for an operator command)."""
        match request:
            case StatusQuery():
                return {"ok": True, "status": self.status()}
            case DeployFile():
                rec = self.local_deploy.deploy_request(request)
                return {"ok": True, "id": rec.id, "version": rec.version, "sha256": rec.sha256}
            case Unpin():
                was = self.activation.unpin()
                self.announcements.catch_up()  # what the channel announced meanwhile
                return {"ok": True, "was": was}
            case OperatorCommand():
                return self._operator(request, reply)
            case DebugHang():  # answered in handle
                return None

    def _operator(self, command: OperatorCommand, reply: queue.Queue[Reply]) -> Reply | None:
        step = self.activation.begin(command.verb, command.version)
        if isinstance(step, ModelRecord):
            return {"ok": True, "version": step.version}
        log.info("`agent %s`: loading %s", step.cmd, step.target.version)
        self.thread.submit(self._load, step, reply)
        return None

    def _load(self, job: OperatorJob, reply: queue.Queue[Reply]) -> None:
        """Runs on the operator thread."""
        try:
            self.post(OperatorLoaded(job, self.activation.load_for(job.target), "", reply))
        except Exception as err:
            self.post(OperatorLoaded(job, None, f"{type(err).__name__}: {err}", reply))

    def loaded(self, event: OperatorLoaded) -> None:
        job, served = event.job, event.served
        if served is None:
            self.activation.abandon(job)
            log.error("`agent %s`: %s does not load: %s", job.cmd, job.target.version, event.error)
            event.reply.put(refused(f"{job.target.version} does not load: {event.error}"))
            return
        try:
            rec = self.activation.finish(job, served)
        except AgentError as err:  # finish released what it did not swap in
            event.reply.put(refused(str(err)))
            return
        except Exception as err:
            self.server.release(served)  # a no-op for the model in service
            log.exception("`agent %s` failed after loading %s", job.cmd, job.target.version)
            event.reply.put(refused(f"internal error: {err}"))
            return
        event.reply.put({"ok": True, "version": rec.version})

    def stop(self) -> None:
        self.thread.shutdown(wait=True, cancel_futures=True)
