"""The drop folder and the config-file watch (the `watchdog` package, inotify on Linux).

A model dropped into the inbox is picked up when the writer closes it (IN_CLOSE_WRITE: scp, cp)
or when it is moved in (IN_MOVED_TO: rsync's rename, mv) — never on create or modify, when it may
be half written. Optional sidecars, copied *before* the model:

    <name>.onnx.sha256 or <name>.sha256   `sha256sum` output (the first word is the hash)
    <name>.json                           {"version": "...", "sha256": "..."} (both optional)

An interrupted copy (a truncated file also closes) fails the sidecar hash or the ONNX parse and is
rejected with a reason; it is never activated. The watchdog thread only enqueues; the coordinator
does the work (`Intake.take`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import DirMovedEvent, FileClosedEvent, FileMovedEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver

from agent.contract.protocol import name_problem, safe_name
from agent.errors import RejectedModel
from agent.system.reload import CONFIG_CHANGED, ReloadRequested

log = logging.getLogger(__name__)


class _StopRace(logging.Filter):
    """watchdog 7 logs "InotifyEmitter.queue_events() called when the thread is inactive" as an
    ERROR when its emitter thread loops once more after a normal stop (a race in its own shutdown);
    in the journal it read as a fault at every `systemctl stop`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_StopRace())

MODEL_SUFFIX = ".onnx"


@dataclass(frozen=True)
class FileDropped:
    """A model file appeared in the drop folder."""

    path: Path


Post = Callable[[FileDropped | ReloadRequested], None]


class _Handler(FileSystemEventHandler):
    def __init__(self, inbox: Path | None, config: Path | None, post: Post) -> None:
        self.inbox = inbox
        self.config = config
        self.post = post

    def on_closed(self, event: FileClosedEvent) -> None:
        self._saw(_path(event.src_path))

    def on_moved(self, event: DirMovedEvent | FileMovedEvent) -> None:
        if event.dest_path and not event.is_directory:
            self._saw(_path(event.dest_path))

    def _saw(self, path: Path) -> None:
        if self.config is not None and path == self.config:
            self.post(ReloadRequested(CONFIG_CHANGED))
        elif self.inbox is not None and path.parent == self.inbox and is_model_name(path.name):
            self.post(FileDropped(path))


def _path(p: bytes | str) -> Path:
    return Path(os.fsdecode(p))


def is_model_name(name: str) -> bool:
    return name.endswith(MODEL_SUFFIX) and not name.startswith(".")


class Watcher:
    """One inotify observer for the inbox and the config file's directory."""

    def __init__(self, inbox: Path | None, config: Path | None, post: Post) -> None:
        # Full events: a move from outside the folder is reported as a move, not as a create.
        self.observer = InotifyObserver(generate_full_events=True)
        self.observer.name = "inbox-watch"
        handler = _Handler(inbox, config.resolve() if config else None, post)
        if inbox is not None:
            inbox.mkdir(parents=True, exist_ok=True)
            self.observer.schedule(handler, str(inbox), recursive=False)
        if config is not None and config.resolve().parent != inbox:
            self.observer.schedule(handler, str(config.resolve().parent), recursive=False)

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(5)


@dataclass(frozen=True)
class Drop:
    """A dropped model, moved out of the inbox, with what its sidecars said."""

    part: Path
    name: str
    version: str
    sha256: str | None
    actual_sha256: str
    size: int
    problem: str = ""  # a sidecar that could not be read


SETTLED_S = 2.0  # a file untouched this long is not being written


class Intake:
    """Coordinator side: move a dropped file out of the inbox and check its sidecar hash."""

    def __init__(self, inbox: Path, incoming: Path) -> None:
        self.inbox = inbox
        self.incoming = incoming

    def existing(self, settled_s: float = SETTLED_S) -> list[Path]:
        """Models left in the inbox while the agent was down (complete or not: the checks decide).
        A file modified in the last `settled_s` may still be being written: its close event will
        come (the watcher runs already), or a later rescan takes it."""
        now = time.time()
        found = []
        for p in sorted(self.inbox.glob(f"*{MODEL_SUFFIX}")):
            with contextlib.suppress(FileNotFoundError):
                if is_model_name(p.name) and _settled(now - p.stat().st_mtime, settled_s):
                    found.append(p)
        return found

    def take(self, path: Path) -> Drop | None:
        if path.parent != self.inbox or not path.is_file() or path.is_symlink():
            return None  # already taken, or not ours to take
        try:
            version, sha, problem = *self._sidecars(path), ""
        except RejectedModel as err:
            version, sha, problem = "", None, err.reason
        self.incoming.mkdir(parents=True, exist_ok=True)
        part = self.incoming / f"{uuid.uuid4().hex}.part"
        shutil.move(str(path), part)  # a rename when the inbox is in the state dir
        name = path.name
        default = safe_name(name[: -len(MODEL_SUFFIX)])  # the file's name, made a valid version
        if version and not problem:
            problem = name_problem(f"{name[: -len(MODEL_SUFFIX)]}.json: version", version) or ""
        if problem:
            version = default
        return Drop(part, name, version or default, sha, _sha256(part), part.stat().st_size, problem)

    def verify(self, drop: Drop) -> None:
        """RejectedModel when the sidecar's hash does not match (the ONNX parse comes after)."""
        if drop.problem:
            drop.part.unlink(missing_ok=True)
            raise RejectedModel("inbox", drop.problem)
        if drop.sha256 is None:
            return
        got = drop.actual_sha256
        if got != drop.sha256:
            drop.part.unlink(missing_ok=True)
            raise RejectedModel(
                "inbox",
                f"{drop.name}: sha256 {got[:12]}… does not match its sidecar {drop.sha256[:12]}… "
                "(an interrupted or altered copy)",
            )

    def _sidecars(self, path: Path) -> tuple[str, str | None]:
        version, sha = "", None
        stem = path.name[: -len(MODEL_SUFFIX)]
        for side in (path.with_name(path.name + ".sha256"), path.with_name(stem + ".sha256")):
            if side.is_file():
                sha = _first_word(side)
                side.unlink()
        manifest = path.with_name(stem + ".json")
        if manifest.is_file():
            try:
                meta = _read_json(manifest)
            finally:
                manifest.unlink(missing_ok=True)
            version = str(meta.get("version") or "")
            sha = str(meta["sha256"]).lower() if meta.get("sha256") else sha
        return version, sha


def _first_word(path: Path) -> str:
    words = path.read_text(errors="replace").split()
    return words[0].lower() if words else ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise RejectedModel("inbox", f"{path.name}: not a JSON object: {err}") from err
    if not isinstance(obj, dict):
        raise RejectedModel("inbox", f"{path.name}: not a JSON object")
    return obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _settled(age_s: float, settled_s: float) -> bool:
    """Not written to for `settled_s`. A modification time well in the future means the wall clock
    was stepped back since: a file being written now would carry about now."""
    return age_s >= settled_s or age_s < -settled_s
