"""A local file into the channel's pipeline (`agent deploy`, the drop folder), on the coordinator
thread. The ONNX check runs first (in its child); the file then becomes the content-addressed
model and takes the pipeline from 'verified' on. Access to the control socket authorises it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.contract.digest import sha256_file
from agent.contract.protocol import Manifest, ObjectRef, now
from agent.coordinator.pipeline import Candidate
from agent.coordinator.reporter import Reporter
from agent.coordinator.scheduler import CandidateScheduler
from agent.coordinator.store import ModelRecord, Store
from agent.delivery.onnx_check import inspect_onnx
from agent.errors import AgentError, RejectedModel
from agent.proc import durable
from agent.system.control import DeployFile

SKIPPABLE = ("sim",)  # checks `agent deploy --skip-check` may force a model past


class LocalDeploy:
    def __init__(self, *, cfg: AgentConfig, store: Store, reporter: Reporter, scheduler: CandidateScheduler) -> None:
        self.cfg = cfg
        self.store = store
        self.reporter = reporter
        self.scheduler = scheduler

    def deploy(self, part: Path, version: str, extra: dict[str, Any] | None = None) -> ModelRecord:
        """The received file (`part`, consumed either way) as a new candidate."""
        try:
            inputs, outputs = inspect_onnx(part)
        except RejectedModel:
            part.unlink(missing_ok=True)
            raise
        sha = sha256_file(part).hexdigest()
        dest = self.store.model_path(sha)
        durable.fsync_file(part)
        durable.replace(part, dest)
        manifest = Manifest(
            version=version or f"local-{sha[:12]}",
            sha256=sha,
            size=dest.stat().st_size,
            model=ObjectRef("local", dest.name),
            inputs=inputs,
            outputs=outputs,
            created_at=now(),
            extra=extra or {},
        )
        skipped = (extra or {}).get("skip_checks")
        forced = f"; forced past: {', '.join(skipped)}" if skipped else ""
        rec = self.reporter.record(manifest, self.cfg.channel, None, "local", f"deployed from a local file{forced}")
        self.scheduler.schedule(Candidate(rec.id, manifest, "local"))
        return rec

    def deploy_request(self, req: DeployFile) -> ModelRecord:
        """`agent deploy`: the request's extras checked first (the file is consumed either way)."""
        try:
            extra = manifest_extra(req)
        except AgentError:
            req.path.unlink(missing_ok=True)
            raise
        return self.deploy(req.path, req.version, extra)


def manifest_extra(req: DeployFile) -> dict[str, Any]:
    """Manifest extras a local deploy may carry: checks forced past, the Go2 deploy config."""
    extra: dict[str, Any] = {}
    unknown = [c for c in req.skip_checks if c not in SKIPPABLE]
    if unknown:
        raise AgentError(f"skip_checks: only {', '.join(map(repr, SKIPPABLE))} can be skipped, got {unknown!r}")
    if req.skip_checks:
        extra["skip_checks"] = sorted(set(req.skip_checks))
    if req.deploy_config is not None:
        from agent.go2.deploy import from_dict

        extra["deploy_config"] = from_dict(req.deploy_config).source
    return extra
