"""Where a candidate's engine comes from: the local cache (verified), a trusted agent of the fleet
(through S3, opt-in), or a build in a child process. Runs on the pipeline thread; it reports
through callbacks only (the coordinator owns every state change)."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.engines import Backend, cache, engine_key
from agent.engines.build import BuildConfig, BuildInfo, run_build
from agent.engines.fleet_share import EngineShare
from agent.errors import Cancelled, ShareError
from agent.proc import durable

log = logging.getLogger(__name__)


@dataclass
class Hooks:
    """How the provisioner speaks while it works on one candidate."""

    stage: Callable[[str], None]  # a new reason for the `building` stage
    progress: Callable[[dict[str, Any]], None]  # the running build (for `agent status`)
    notify: Callable[[str, dict[str, Any]], None]  # an event for the cloud
    cancelled: Callable[[], str | None]  # why to stop now, or None


@dataclass(frozen=True)
class Obtained:
    key: str
    path: Path
    source: str  # "cache", "shared" or "built"
    precision: str
    figures: dict[str, Any] = field(default_factory=dict)


class Provisioner:
    def __init__(
        self,
        *,
        engines_dir: Path,
        backend: Backend,
        cfg: BuildConfig,
        share: EngineShare | None,
        device_id: str,
        refused_file: Path | None = None,
    ) -> None:
        self.engines_dir = engines_dir  # <state_dir>/engines: one file per engine key (agent.coordinator.store)
        self.backend = backend
        self.cfg = cfg
        self.share = share
        self.device_id = device_id
        # Keys whose shared engine failed here (did not load, crashed at warm-up): never fetched again.
        self.refused = RefusedShares(refused_file or engines_dir.parent / "cache" / "refused-shared-engines.json")
        self._built: set[str] = set()  # keys built here and not yet settled
        self._leases: set[str] = set()
        self._key_locks: dict[str, tuple[threading.Lock, int]] = {}  # key -> (lock, holders and waiters)
        self._guard = threading.Lock()

    def engine_path(self, key: str) -> Path:
        return self.engines_dir / key

    def obtain(self, model_sha256: str, model_path: Path, hooks: Hooks, precision: str | None = None) -> Obtained:
        """The engine for `precision` (the backend's first by default). Thread-safe per key: the
        pipeline and an operator command that need the same engine build it once (the second finds
        it in the cache), never into each other's file."""
        precision = precision or self.backend.precisions()[0]
        key = engine_key(model_sha256, self.backend, precision)
        with self._locked(key):
            return self._obtain(key, precision, model_path, hooks)

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """The key's lock, kept only while someone holds or waits for it (a daemon that swaps
        every night for a year would otherwise keep one per model)."""
        with self._guard:
            lock, users = self._key_locks.get(key, (threading.Lock(), 0))
            self._key_locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                _, holders = self._key_locks[key]
                if holders == 1:
                    del self._key_locks[key]
                else:
                    self._key_locks[key] = (lock, holders - 1)

    def _obtain(self, key: str, precision: str, model_path: Path, hooks: Hooks) -> Obtained:
        path = self.engine_path(key)
        why = cache.problem(path, key)
        figures = {"precision": precision}
        if why is None:
            hooks.stage(f"engine cache hit ({key})")
            return Obtained(key, path, "cache", precision, {"engine_source": "cache", **figures})
        if why != "no engine file":
            log.warning("engine %s is not usable (%s): discarding it", key, why)
            hooks.notify("engine_discarded", {"engine_key": key, "reason": why})
            cache.discard(path)
        if self.share is not None and key not in self.refused and self._from_share(key, path, hooks):
            return Obtained(key, path, "shared", precision, {"engine_source": "shared", **figures})
        return self._build(key, precision, model_path, hooks)

    def rebuild(self, got: Obtained, model_path: Path, hooks: Hooks) -> Obtained:
        """An engine that passed its hash check but does not load, or crashed its serving process:
        built again here, once. A shared one is refused for good (this key is never fetched again)."""
        if got.source == "shared":
            self.refused.add(got.key)
        with self._locked(got.key):
            cache.discard(self.engine_path(got.key))
            return self._build(got.key, got.precision, model_path, hooks)

    def settle(self, key: str, passed: bool) -> dict[str, Any]:
        """After the gate: share what we built if it passed; free the lease either way."""
        figures: dict[str, Any] = {}
        built = key in self._built
        self._built.discard(key)
        if self.share is None:
            return figures
        try:
            if passed and built and self.share.cfg.upload:
                meta = cache.read_sidecar(self.engine_path(key))
                if meta is not None:
                    self.share.upload(key, self.engine_path(key), meta)
                    figures["engine_shared"] = True
        except ShareError as err:
            log.warning("%s", err)
        finally:
            if key in self._leases:
                self._leases.discard(key)
                self.share.release(key)
        return figures

    # -- building here ---------------------------------------------------------------------------
    def _build(self, key: str, precision: str, model_path: Path, hooks: Hooks) -> Obtained:
        path = self.engine_path(key)
        hooks.stage(f"building {self.backend.name} {self.backend.version()} {precision} engine {key}")

        def on_progress(info: BuildInfo) -> None:
            hooks.progress(info.to_json())

        try:
            seconds = run_build(
                self.backend,
                model_path,
                path,
                self.cfg,
                precision=precision,
                cancelled=hooks.cancelled,
                on_progress=on_progress,
            )
        except BaseException:
            self._drop_lease(key)
            raise
        backend = self.backend
        meta = cache.describe(
            path, key, backend=backend.name, version=backend.version(), builder=self.device_id, build_s=seconds
        )
        cache.write_sidecar(path, meta)
        self._built.add(key)
        hooks.notify("engine_built", {"engine_key": key, "build_s": meta.build_s, "size": meta.size})
        figures = {"engine_source": "built", "build_s": meta.build_s, "precision": precision}
        return Obtained(key, path, "built", precision, figures)

    def _drop_lease(self, key: str) -> None:
        if self.share is not None and key in self._leases:
            self._leases.discard(key)
            self.share.release(key)

    # -- the fleet's engines -----------------------------------------------------------------------
    def _from_share(self, key: str, path: Path, hooks: Hooks) -> bool:
        """True when a trusted agent's engine landed at `path`; False: build here."""
        assert self.share is not None
        share, told, waiting_on = self.share, set[str](), ""
        hold_s = self.cfg.time_limit_s + 60
        deadline = time.monotonic() + hold_s
        try:
            while time.monotonic() < deadline:
                found = self._fetch_shared(key, path, hooks, told)
                if found is not None:
                    return found
                lease = share.acquire(key, hold_s)
                if lease.ours:
                    self._leases.add(key)
                    # The last holder may have shared its engine and let go between our look and our put.
                    if self._fetch_shared(key, path, hooks, told):
                        self._drop_lease(key)
                        return True
                    return False
                if lease.holder and not share.trusted(lease.holder):
                    hooks.notify("shared_engine_ignored", _why(key, lease.holder, "lease held by an untrusted builder"))
                    return False
                reason = hooks.cancelled()
                if reason:
                    raise Cancelled(reason)
                if lease.holder != waiting_on:
                    waiting_on = lease.holder
                    hooks.stage(f"waiting for {lease.holder} to build engine {key} (shared)")
                time.sleep(share.cfg.poll_s * random.uniform(0.8, 1.2))
        except ShareError as err:
            log.warning("engine sharing unavailable (%s): building locally", err)
            hooks.notify("shared_engine_ignored", _why(key, "", str(err)))
        return False

    def _fetch_shared(self, key: str, path: Path, hooks: Hooks, told: set[str]) -> bool | None:
        """True: a trusted engine is at `path`; False: a trusted record's engine is bad (build
        here); None: no usable record yet."""
        assert self.share is not None
        for builder, meta in self.share.records(key).items():
            if isinstance(meta, str):
                if builder not in told:  # one event per builder, not one per poll
                    told.add(builder)
                    hooks.notify("shared_engine_ignored", _why(key, builder, meta))
                continue
            problem = self.share.download(key, meta, path)
            if problem is None:
                hooks.stage(f"engine {key} from {builder} (shared, sha256 verified)")
                return True
            hooks.notify("shared_engine_ignored", _why(key, builder, problem))
            return False
        return None


def _why(key: str, builder: str, reason: str) -> dict[str, Any]:
    return {"engine_key": key, "builder": builder, "reason": reason}


class RefusedShares:
    """Engine keys whose shared engine failed on this device, kept across restarts (a small JSON
    list in the cache directory, written atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._keys: set[str] | None = None

    def __contains__(self, key: str) -> bool:
        return key in self._load()

    def add(self, key: str) -> None:
        keys = self._load() | {key}
        self._keys = keys
        try:
            durable.makedirs(self.path.parent)
            durable.write_text(self.path, json.dumps(sorted(keys)))
        except OSError as err:  # still refused for this run
            log.warning("could not record the refused shared engine %s: %s", key, err)

    def _load(self) -> set[str]:
        if self._keys is None:
            try:
                self._keys = {str(k) for k in json.loads(self.path.read_text())}
            except (OSError, ValueError, TypeError):
                self._keys = set()
        return self._keys
