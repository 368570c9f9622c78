"""What happens to one candidate model, off the coordinator thread: download and verify, check the
ONNX, build (or find) its engine, load it and pass the gate. Stages are reported back through
`report`; the coordinator owns every state change."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import fetch
from agent.engines import Backend, Engine, engine_key
from agent.errors import RejectedModel
from agent.lifecycle import ModelState
from agent.onnxinfo import check_onnx, signature
from agent.protocol import Manifest, TensorSpec, signature_diff
from agent.serve import ServedModel
from agent.store import Store
from agent.validate import BehaviourCheck, run_gate

log = logging.getLogger(__name__)

Report = Callable[[int, ModelState, str, dict[str, Any]], None]
ProgressReport = Callable[[int, int, int], None]


@dataclass(frozen=True)
class Candidate:
    record_id: int
    manifest: Manifest
    source: str  # "channel" or "local"


@dataclass(frozen=True)
class ActiveContract:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def skipped_checks(cand: Candidate) -> frozenset[str]:
    """Checks a local deploy forced past (`agent deploy --skip-check sim`); never from a channel."""
    if cand.source != "local":
        return frozenset()
    return frozenset(str(c) for c in cand.manifest.extra.get("skip_checks", []))


class Pipeline:
    def __init__(
        self,
        store: Store,
        backend: Backend,
        s3_factory: Callable[[], Any],
        reserve_bytes: int,
        report: Report,
        progress: ProgressReport,
        behaviour: BehaviourCheck | None = None,
    ) -> None:
        self.store = store  # only its path helpers are used here: no DB access off the coordinator
        self.backend = backend
        self.s3_factory = s3_factory
        self.reserve_bytes = reserve_bytes
        self.report = report
        self.progress = progress
        self.behaviour = behaviour  # e.g. the Go2 sim gate
        self.cancel = threading.Event()

    def prepare(self, cand: Candidate, active: ActiveContract | None) -> ServedModel:
        m = cand.manifest
        model_path = self.store.model_path(m.sha256)
        golden = self._download(cand, model_path)
        self._verify(cand, model_path)
        key, engine_path = self._build(cand, model_path)
        self.report(cand.record_id, ModelState.VALIDATING, "engine loaded; running the gate", {})
        engine = self._load(engine_path, model_path)
        skip = skipped_checks(cand)
        try:
            gate = run_gate(
                engine,
                m,
                active.inputs if active else None,
                active.outputs if active else None,
                golden,
                self.behaviour,
                skip,
            )
        except BaseException:
            engine.close()
            raise
        reason = "passed the gate" + (f" (forced past: {', '.join(sorted(skip))})" if skip else "")
        self.report(cand.record_id, ModelState.STAGED, reason, {"engine_key": key, **gate.figures})
        return ServedModel(engine, m.version, m.sha256, self.backend.name, m.extra.get("deploy_config"))

    def _download(self, cand: Candidate, model_path: Path) -> Path | None:
        m = cand.manifest
        if cand.source == "channel":
            self.report(cand.record_id, ModelState.DOWNLOADING, f"s3://{m.model.bucket}/{m.model.key}", {})
            s3 = self.s3_factory()
            fetch.fetch(
                s3,
                m.model,
                model_path,
                m.sha256,
                m.size,
                self.reserve_bytes,
                lambda done, total: self.progress(cand.record_id, done, total),
                self.cancel,
            )
            if m.golden is not None and m.golden_sha256 and m.golden_size is not None:
                golden = self.store.golden_path(m.sha256)
                fetch.fetch(
                    s3,
                    m.golden,
                    golden,
                    m.golden_sha256,
                    m.golden_size,
                    self.reserve_bytes,
                    lambda *_: None,
                    self.cancel,
                )
                return golden
        return None

    def _verify(self, cand: Candidate, model_path: Path) -> None:
        proto = check_onnx(model_path)
        inputs, outputs = signature(proto)
        del proto
        m = cand.manifest
        for what, got, want in (("inputs", inputs, m.inputs), ("outputs", outputs, m.outputs)):
            diff = signature_diff(want, got, f"{what} of the ONNX file and the manifest")
            if diff:
                raise RejectedModel("verify", diff)
        self.report(cand.record_id, ModelState.VERIFIED, "sha256 matches; ONNX checker passed", {})

    def _build(self, cand: Candidate, model_path: Path) -> tuple[str, Path]:
        key = engine_key(cand.manifest.sha256, self.backend)
        engine_path = self.store.engine_path(key)
        if engine_path.exists():
            self.report(cand.record_id, ModelState.BUILDING, f"engine cache hit ({key})", {})
            return key, engine_path
        self.report(cand.record_id, ModelState.BUILDING, f"building {self.backend.name} engine {key}", {})
        try:
            self.backend.build(model_path, engine_path)
        except Exception as err:
            raise RejectedModel("build", f"{self.backend.name} build failed: {err}") from err
        return key, engine_path

    def _load(self, engine_path: Path, model_path: Path) -> Engine:
        """A cached engine that does not load is rebuilt once, never trusted."""
        try:
            return self.backend.load(engine_path)
        except Exception as err:
            log.warning("engine %s does not load (%s): rebuilding it", engine_path.name, err)
            engine_path.unlink(missing_ok=True)
        try:
            self.backend.build(model_path, engine_path)
            return self.backend.load(engine_path)
        except Exception as err:
            raise RejectedModel("build", f"engine does not load: {err}") from err
