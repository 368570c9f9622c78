"""What happens to one candidate model, off the coordinator thread: download and verify, check the
ONNX, build (or find) its engine, load it and pass the gate. Stages are reported back through
`report`; the coordinator owns every state change."""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import S3Config
from agent.contract.digest import sha256_file
from agent.contract.protocol import Manifest, signature_diff
from agent.coordinator.gate import GateContext, run_gate
from agent.coordinator.lifecycle import ModelState
from agent.coordinator.store import Store
from agent.delivery.download_process import download
from agent.delivery.onnx_check import inspect_onnx
from agent.delivery.s3_fetch import Wanted
from agent.engines.provisioner import Hooks, Obtained, Provisioner
from agent.errors import EngineLoadFailed, RejectedModel, ServingFailed
from agent.proc import crashpoints
from agent.serving.server import InferenceServer, ServedModel

log = logging.getLogger(__name__)

PROGRESS_STEPS = 50  # a download reports at most this many progress steps (and every MiB at most)


# -- what the pipeline thread posts to the coordinator ---------------------------------------------
@dataclass(frozen=True)
class StageReached:
    record_id: int
    state: ModelState
    reason: str
    figures: dict[str, Any]


@dataclass(frozen=True)
class DownloadProgress:
    record_id: int
    done: int
    total: int


@dataclass(frozen=True)
class BuildProgressed:
    """The running build's state for `agent status` (pid, stage, percent, elapsed_s)."""

    record_id: int
    info: dict[str, Any]


@dataclass(frozen=True)
class Notify:
    """An event for the cloud (e.g. engine sharing's), emitted by the coordinator."""

    kind: str
    fields: dict[str, Any]


PipelineEvent = StageReached | DownloadProgress | BuildProgressed | Notify


@dataclass(frozen=True)
class Candidate:
    record_id: int
    manifest: Manifest
    source: str  # "channel" or "local"


def skipped_checks(cand: Candidate) -> frozenset[str]:
    """Checks a local deploy forced past (`agent deploy --skip-check sim`); never from a channel."""
    if cand.source != "local":
        return frozenset()
    return frozenset(str(c) for c in cand.manifest.extra.get("skip_checks", []))


class Pipeline:
    def __init__(
        self,
        *,
        store: Store,
        serving: InferenceServer,
        engines: Provisioner,
        s3: S3Config,
        reserve_bytes: int,
        post: Callable[[PipelineEvent], None],
    ) -> None:
        self.store = store  # only its path helpers are used here: no DB access off the coordinator
        self.serving = serving  # loads each candidate in a serving process; the gate runs there
        self.engines = engines
        self.s3 = s3
        self.reserve_bytes = reserve_bytes
        self.post = post
        self.cancel = threading.Event()
        self._superseded: dict[int, str] = {}  # record id -> the newer version that superseded it

    def report(self, record_id: int, state: ModelState, reason: str, figures: dict[str, Any]) -> None:
        self.post(StageReached(record_id, state, reason, figures))

    def supersede(self, record_id: int, newer: str) -> None:
        """Called from the coordinator: a build in progress for `record_id` stops."""
        self._superseded[record_id] = newer

    def free_partial(self, sha256: str) -> int:
        """After a full disk: the candidate's partial downloads and every engine being written
        (one candidate is at work at a time) go; a download then starts over."""
        parts = [
            *self.store.models_dir.glob(f"{sha256}.onnx.part*"),
            *self.store.golden_dir.glob(f"{sha256}.npz.part*"),
            *self.store.engines_dir.glob("*.part"),
        ]
        for p in parts:
            p.unlink(missing_ok=True)
        return len(parts)

    def prepare(self, cand: Candidate, gate: GateContext) -> ServedModel:
        """Download, verify, then an engine per precision the backend tries (FP16 first where the
        hardware has it) until one passes the gate; a later precision is tried only when the
        earlier engine's outputs missed the golden ones (its precision, not the model, is at fault)."""
        model_path = self.store.model_path(cand.manifest.sha256)
        gate.golden = self._download(cand, model_path)
        self._verify(cand, model_path)
        precisions = self.engines.backend.precisions()
        fallback = ""
        for precision, then in zip(precisions, [*precisions[1:], None], strict=True):
            try:
                return self._prepare_at(cand, gate, model_path, precision, fallback)
            except RejectedModel as err:
                golden = (err.figures.get("gate") or {}).get("golden") or {}
                if then is None or err.stage != "validate" or golden.get("passed", True):
                    raise
                fallback = (
                    f"{precision} engine failed its golden check (max abs error {golden.get('max_abs_err')}, "
                    f"atol {golden.get('atol')}): rebuilt in {then}"
                )
                log.warning("%s: %s", cand.manifest.version, fallback)
                self.report(cand.record_id, ModelState.BUILDING, fallback, {"fallback": err.figures})
        raise AssertionError("unreachable: the last precision raises")

    def _prepare_at(
        self, cand: Candidate, gate: GateContext, model_path: Path, precision: str, fallback: str
    ) -> ServedModel:
        got = self._build(cand, model_path, precision)
        try:
            served = self._load(cand, got, model_path)
        except BaseException:
            self.engines.settle(got.key, passed=False)
            raise
        self.report(cand.record_id, ModelState.VALIDATING, f"{precision} engine loaded; running the gate", {})
        try:
            with self.serving.gating(served) as engine:
                results = run_gate(engine, cand.manifest, dataclasses.replace(gate, precision=precision))
        except BaseException:
            self.serving.release(served)
            self.engines.settle(got.key, passed=False)
            raise
        shared = self.engines.settle(got.key, passed=True)
        checks = {r.name: r.to_json() for r in results}
        figures = {"engine_key": got.key, **got.figures, **shared, "gate": checks}
        if fallback:
            figures["precision_note"] = fallback
        forced = [r.name for r in results if r.figures.get("forced")]
        notes = [f"forced past {', '.join(forced)}"] * bool(forced) + [fallback] * bool(fallback)
        note = f" ({'; '.join(notes)})" if notes else ""
        self.report(cand.record_id, ModelState.STAGED, f"passed the gate as {precision}{note}", figures)
        return served

    def stored_engine(self, sha256: str, precision: str | None = None) -> Path:
        """A stored model's engine file for an operator command (cache, else shared, else a build),
        in the precision it passed the gate with."""
        model_path = self.store.model_path(sha256)
        quiet = Hooks(
            stage=lambda _r: None,
            progress=lambda _i: None,
            notify=lambda _k, _f: None,
            cancelled=lambda: "the agent is stopping" if self.cancel.is_set() else None,
        )
        got = self.engines.obtain(sha256, model_path, quiet, precision)
        if got.source == "built":
            self.engines.settle(got.key, passed=False)  # frees its fleet build lease; shared only after a gate
        return got.path

    def _download(self, cand: Candidate, model_path: Path) -> Path | None:
        m = cand.manifest
        if cand.source == "channel":
            where = "already stored; checking its sha256" if model_path.exists() else ""
            self.report(cand.record_id, ModelState.DOWNLOADING, where or f"s3://{m.model.bucket}/{m.model.key}", {})
            if not _holds(model_path, m.sha256):
                progress = functools.partial(self._progress, cand.record_id, [0])
                want = Wanted(m.model, model_path, m.sha256, m.size)
                download(self.s3, want, reserve_bytes=self.reserve_bytes, progress=progress, cancel=self.cancel)
            if m.golden is not None and m.golden_sha256 and m.golden_size is not None:
                golden = self.store.golden_path(m.sha256)
                if not _holds(golden, m.golden_sha256):
                    want = Wanted(m.golden, golden, m.golden_sha256, m.golden_size)
                    download(self.s3, want, reserve_bytes=self.reserve_bytes, progress=_quiet, cancel=self.cancel)
                return golden
        return None

    def _progress(self, record_id: int, last: list[int], done: int, total: int) -> None:
        """Posts the download's progress in at most PROGRESS_STEPS steps (and every MiB at most)."""
        crashpoints.reached("download:early" if done < total * 0.8 else "download:late")
        if done == total or done - last[0] >= max(total // PROGRESS_STEPS, 1 << 20):
            last[0] = done
            self.post(DownloadProgress(record_id, done, total))

    def _verify(self, cand: Candidate, model_path: Path) -> None:
        if cand.source == "local":  # checked by the deploy that made this content-addressed file
            self.report(cand.record_id, ModelState.VERIFIED, "checked when deployed (ONNX checker passed)", {})
            return
        inputs, outputs = inspect_onnx(model_path)  # in a child: a crafted file may crash protobuf
        m = cand.manifest
        for what, got, want in (("inputs", inputs, m.inputs), ("outputs", outputs, m.outputs)):
            diff = signature_diff(want, got, f"{what} of the ONNX file and the manifest")
            if diff:
                raise RejectedModel("verify", diff)
        self.report(cand.record_id, ModelState.VERIFIED, "sha256 matches; ONNX checker passed", {})

    def _hooks(self, cand: Candidate) -> Hooks:
        rid, version = cand.record_id, cand.manifest.version

        def cancelled() -> str | None:
            if self.cancel.is_set():
                return "the agent is stopping"
            newer = self._superseded.get(rid)
            return f"superseded by {newer}" if newer else None

        return Hooks(
            stage=lambda reason: self.report(rid, ModelState.BUILDING, reason, {}),
            progress=functools.partial(self._build_progress, rid),
            notify=lambda kind, fields: self.post(Notify(kind, {"model_id": rid, "version": version, **fields})),
            cancelled=cancelled,
        )

    def _build_progress(self, record_id: int, info: dict[str, Any]) -> None:
        crashpoints.reached("build:running")
        self.post(BuildProgressed(record_id, info))

    def _build(self, cand: Candidate, model_path: Path, precision: str) -> Obtained:
        hooks = self._hooks(cand)
        try:
            with self.serving.pool.room(hooks.cancelled, load=False):  # the build child counts (a CUDA context)
                return self.engines.obtain(cand.manifest.sha256, model_path, hooks, precision)
        finally:
            self._superseded.pop(cand.record_id, None)

    def _load(self, cand: Candidate, got: Obtained, model_path: Path) -> ServedModel:
        """The candidate in a serving process (the gate runs there). An engine that passed its
        hash check but does not load, or crashes its process at warm-up, is rebuilt here once
        (a shared one is never fetched again): the engine is at fault, not yet the model."""
        m = cand.manifest
        try:
            with self.serving.pool.room(self._hooks(cand).cancelled, load=True):
                return self._serve(got, m)
        except ServingFailed as err:  # EngineLoadFailed, or the process died loading or warming up
            log.warning("engine %s (%s) failed in its serving process (%s): rebuilding it", got.key, got.source, err)
            self.report(cand.record_id, ModelState.BUILDING, f"the {got.source} engine failed: {err}; rebuilding", {})
        hooks = self._hooks(cand)
        with self.serving.pool.room(hooks.cancelled, load=False):
            again = self.engines.rebuild(got, model_path, hooks)
        try:
            with self.serving.pool.room(hooks.cancelled, load=True):
                return self._serve(again, m)
        except ServingFailed as err:
            stage = "build" if isinstance(err, EngineLoadFailed) else "load"
            raise RejectedModel(stage, f"the engine does not load, rebuilt here too: {err}") from err

    def _serve(self, got: Obtained, m: Manifest) -> ServedModel:
        return self.serving.load(got.path, m.version, m.sha256, m.extra.get("deploy_config"))


def _quiet(_done: int, _total: int) -> None:
    """A golden file's download reports no progress."""


def _holds(path: Path, sha256: str) -> bool:
    """A content-addressed file that is already here needs no download."""
    return path.exists() and sha256_file(path).hexdigest() == sha256
