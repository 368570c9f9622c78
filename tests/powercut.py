"""The power-cut harness: what a state dir would hold if the power went at any fsync, fdatasync or
rename of the agent or its children (SQLite's commits included), under the POSIX worst case.

The agent runs with tests/powercut_shim.c preloaded; before each such call the harness takes a
snapshot of what is durable at that instant, after it learns what became durable:
- a file's bytes are durable up to its size at its last fsync/fdatasync (an append-only view:
  the files on the path are written once, or appended, as SQLite's WAL is between checkpoints);
  a file never synced in the run is empty (delayed allocation), one from before the run whole;
- a directory's entries (a rename's result, a new file's name) are durable once the directory
  itself is synced; until then the directory holds what it held at its last sync (or at the start);
- SQLite's `-shm` is never durable (SQLite rebuilds it from the WAL).

The state dir is synced (os.sync) before the run starts. Concurrent threads may write between a
sync and the harness's reading of the file: what it records can only be later, never earlier,
than what was synced (it reads at most the size the shim saw)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHIM = Path(__file__).with_name("powercut_shim.c")


def build_shim(out: Path) -> Path:
    so = out / "powercut_shim.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(so), str(SHIM), "-ldl"], check=True)
    return so


@dataclass
class Snapshot:
    index: int
    at: str  # the call the power was cut before: "fdatasync agent.db-wal"
    files: dict[str, bytes]  # relative path -> durable bytes
    dirs: list[str]
    seen: list[Any] = field(default_factory=list)  # what the cloud had received by then
    phase: str = ""  # the test's name for what the agent was doing (PowerCuts.phase then)


Entry = tuple[int, bool]  # (inode, is a directory)


class PowerCuts:
    """The harness's side of the shim's socket, and the durable view of `root`."""

    def __init__(self, root: Path, sock: Path, seen: list[Any]) -> None:
        self.root = root
        self.sock_path = sock
        self.seen = seen  # appended to by the test's MQTT subscriber
        self.files: dict[int, bytes] = {}
        self.dirs: dict[str, dict[str, Entry]] = {}
        self.snapshots: list[Snapshot] = []
        self.cuts = 0
        self.phase = ""  # set by the test as the run goes on: each snapshot carries it
        self.calls: list[tuple[str, str]] = []  # (phase, call) of every call announced, in order:
        # ("swap", "pre fsync models/<sha>.onnx.part")
        self._digests: set[str] = set()
        self._lock = threading.Lock()
        self._record_all(root)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(sock))
        self._server.listen(64)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def env(self, shim: Path) -> dict[str, str]:
        return {"LD_PRELOAD": str(shim), "POWERCUT_DIR": str(self.root), "POWERCUT_SOCKET": str(self.sock_path)}

    def __enter__(self) -> PowerCuts:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() (Linux)
        self._server.close()
        self._thread.join(5)

    # -- the durable view -----------------------------------------------------------------------------
    def _record_all(self, top: Path) -> None:
        """Before the run (after os.sync): everything is durable."""
        for folder, _subdirs, names in os.walk(top):
            here = Path(folder)
            self.dirs[self._rel(here)] = self._listing(here)
            for name in names:
                p = here / name
                self.files[p.stat().st_ino] = p.read_bytes()

    def _rel(self, p: Path) -> str:
        return str(p.relative_to(self.root))

    @staticmethod
    def _listing(folder: Path) -> dict[str, Entry]:
        out = {}
        for p in folder.iterdir():
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            out[p.name] = (st.st_ino, p.is_dir())
        return out

    def _synced(self, path: Path, size: int) -> None:
        try:
            if path.is_dir():
                self.dirs[self._rel(path)] = self._listing(path)
                return
            ino = path.stat().st_ino
            with path.open("rb") as f:
                self.files[ino] = f.read(size)
        except FileNotFoundError:
            pass  # gone since (a .part already renamed by another thread): its inode keeps its last view

    def _cut(self, at: str) -> None:
        self.cuts += 1
        files: dict[str, bytes] = {}
        dirs: list[str] = []
        self._materialize(".", files, dirs)
        digest = hashlib.sha256()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        key = f"{self.phase}|{digest.hexdigest()}|" + "|".join(sorted(dirs))  # each phase from its start
        if key in self._digests:
            return
        self._digests.add(key)
        self.snapshots.append(Snapshot(len(self.snapshots), at, files, dirs, list(self.seen), self.phase))

    def _materialize(self, rel: str, files: dict[str, bytes], dirs: list[str]) -> None:
        dirs.append(rel)
        for name, (ino, is_dir) in self.dirs.get(rel, {}).items():
            sub = name if rel == "." else f"{rel}/{name}"
            if is_dir:
                self._materialize(sub, files, dirs)
            elif not name.endswith("-shm"):
                files[sub] = self.files.get(ino, b"")

    # -- the shim's socket ----------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                self._handle(data.decode(errors="replace").rstrip("\n").split("\t"))
                conn.sendall(b"k")

    def _handle(self, parts: list[str]) -> None:
        kind, op, size, path = parts[0], parts[1], int(parts[2]), Path(parts[3])
        if path.name.endswith(" (deleted)"):
            return
        with self._lock:
            rel = self._rel(path)
            self.calls.append((self.phase, f"{kind} {op} {rel}"))
            if kind == "pre":
                self._cut(f"{op} {rel}")
            elif op in ("fsync", "fdatasync"):
                self._synced(path, size)

    def write(self, snap: Snapshot, dest: Path) -> None:
        for rel in snap.dirs:
            (dest / rel).mkdir(parents=True, exist_ok=True)
        for rel, data in snap.files.items():
            (dest / rel).write_bytes(data)
