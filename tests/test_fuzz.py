"""Every parser of outside input, fuzzed with hypothesis (1000 examples each): MQTT payloads,
manifests, signatures, the config, inference-socket frames and control-socket requests. Each
either accepts or raises the project's own error with a message; none crashes or writes a file.
Run with -s to see how many examples each ran."""

from __future__ import annotations

import json
import queue
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import AgentConfig, load
from agent.contract.protocol import Announcement, Manifest, decode
from agent.contract.signing import Trust
from agent.contract.tomlconf import build
from agent.coordinator.store import Store
from agent.errors import AgentError, ConfigError, ProtocolError, RejectedModel, SignatureRejected
from agent.serving import wire
from agent.system.control import ControlRequest, ControlServer, DeployFile, Request, parse_request
from agent.system.inbox import Intake
from agent.system.peercred import Authority

EXAMPLES = 1000
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from([10**400, -(2**63), 2**64, 1e308, -0.0])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
traversal = st.sampled_from(["../../etc/passwd", "/abs/path", "..", "a/../../b", "x\0y", "~root", "C:\\x", ""])

VALID_MANIFEST: dict[str, Any] = {
    "version": "v1",
    "sha256": "a" * 64,
    "size": 10,
    "model": {"bucket": "b", "key": "models/x.onnx"},
    "inputs": [{"name": "obs", "dtype": "float32", "shape": [1, 48]}],
    "outputs": [{"name": "actions", "dtype": "float32", "shape": [1, 12]}],
    "created_at": 1.0,
}


class Count:
    """Counts the examples a test really ran, printed at the end (the figure for the issue note)."""

    def __init__(self, name: str) -> None:
        self.name, self.n = name, 0

    def __call__(self) -> None:
        self.n += 1

    def report(self) -> None:
        print(f"fuzz {self.name}: {self.n} examples")
        assert self.n >= EXAMPLES


def _mutations(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid object with some keys replaced by anything (or path tricks) or dropped."""
    keys = st.sampled_from(sorted(base))
    return st.builds(
        lambda repl, drop: {**{k: v for k, v in base.items() if k not in drop}, **repl},
        st.dictionaries(keys | st.text(max_size=8), json_values | traversal, max_size=3),
        st.sets(keys, max_size=2),
    )


def _only(errors: tuple[type[BaseException], ...], fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except errors as err:
        assert str(err), f"{type(err).__name__} without a message"
        return None


# -- MQTT payloads --------------------------------------------------------------------------------
def test_fuzz_announcement_bytes() -> None:
    count = Count("announcement bytes (decode + Announcement.from_json)")

    @FUZZ
    @given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
    def run(raw: bytes) -> None:
        count()
        _only((ProtocolError,), lambda: Announcement.from_json(decode(raw, "announcement")))

    run()
    count.report()


def test_fuzz_announcement_structure(tmp_path: Path) -> None:
    count = Count("announcement objects (mutated manifest, channel, sequence, signature)")
    store = Store(tmp_path / "state")
    base = {"protocol": 1, "type": "announcement", "channel": "walk", "sequence": 3, "issued_at": 1.0}

    @FUZZ
    @given(_mutations(base), _mutations(VALID_MANIFEST))
    def run(ann: dict[str, Any], manifest: dict[str, Any]) -> None:
        count()
        parsed = _only((ProtocolError,), lambda: Announcement.from_json({**ann, "manifest": manifest}))
        if parsed is not None:  # whatever was accepted, the files it names stay in the state dir
            for p in (store.model_path(parsed.manifest.sha256), store.golden_path(parsed.manifest.sha256)):
                assert p.resolve().is_relative_to((tmp_path / "state").resolve())

    def files() -> list[Path]:  # SQLite's own -wal/-shm files come and go with the connection
        return sorted(p for p in tmp_path.rglob("*") if not p.name.startswith("agent.db"))

    before = files()
    run()
    store.close()
    assert files() == before  # nothing written
    count.report()


def test_fuzz_manifest() -> None:
    count = Count("Manifest.from_json")

    @FUZZ
    @given(_mutations(VALID_MANIFEST) | json_values)
    def run(obj: Any) -> None:
        count()
        _only((ProtocolError,), lambda: Manifest.from_json(obj))

    run()
    count.report()


def test_fuzz_signature_check() -> None:
    count = Count("Trust.check (signatures)")
    trust = Trust(["nttaIBc0jeVvA8YlopzcqOAp8mrsse7U/itWzXzriwo="])
    ann = {"protocol": 1, "type": "announcement", "channel": "walk", "sequence": 1, "manifest": VALID_MANIFEST}

    @FUZZ
    @given(json_values | _mutations({"alg": "ed25519", "key_id": "761cf60c56dad6fa", "value": "AAAA"}), json_values)
    def run(sig: Any, extra: Any) -> None:
        count()
        with pytest.raises(SignatureRejected):
            trust.check({**ann, "signature": sig, "x": extra})

    run()
    count.report()


# -- the config -----------------------------------------------------------------------------------
def test_fuzz_config() -> None:
    count = Count("config (tomlconf.build of AgentConfig)")
    base = {"channel": "walk", "state_dir": "/tmp/s", "socket": "/tmp/s.sock", "device_id": "d"}
    sections = st.dictionaries(
        st.sampled_from(["mqtt", "s3", "telemetry", "security", "inbox", "log_level", "backend"]),
        json_values
        | st.dictionaries(
            st.sampled_from(
                ["url", "trusted_keys", "interval_s", "enabled", "path", "admin_group", "keepalive_s", "bogus"]
            ),
            json_values,
        ),
        max_size=3,
    )

    @FUZZ
    @given(_mutations(base), sections)
    def run(top: dict[str, Any], extra: dict[str, Any]) -> None:
        count()
        _only((ConfigError,), lambda: build(AgentConfig, {**top, **extra}))

    run()
    count.report()


def test_fuzz_config_text(tmp_path: Path) -> None:
    count = Count("config text (read_toml + build)")
    path = tmp_path / "agent.toml"
    valid = 'channel = "walk"\nstate_dir = "/tmp/s"\nsocket = "/tmp/s.sock"\n[security]\ntrusted_keys = []\n'

    @FUZZ
    @given(
        st.text(max_size=200)
        | st.builds(lambda cut, junk: valid[:cut] + junk, st.integers(0, len(valid)), st.text(max_size=30))
    )
    def run(text: str) -> None:
        count()
        path.write_text(text, errors="surrogatepass")
        _only((ConfigError,), lambda: load(path))

    run()
    count.report()


def test_fuzz_inbox_sidecars(tmp_path: Path) -> None:
    count = Count("drop-folder sidecars (.sha256, .json)")
    inbox, incoming = tmp_path / "inbox", tmp_path / "incoming"
    inbox.mkdir()
    intake = Intake(inbox, incoming)
    sidecar = st.binary(max_size=100) | json_values.map(lambda v: json.dumps(v).encode())

    @FUZZ
    @given(st.none() | sidecar, st.none() | sidecar)
    def run(sha_file: bytes | None, json_file: bytes | None) -> None:
        count()
        (inbox / "m.onnx").write_bytes(b"model bytes")
        if sha_file is not None:
            (inbox / "m.onnx.sha256").write_bytes(sha_file)
        if json_file is not None:
            (inbox / "m.json").write_bytes(json_file)
        drop = intake.take(inbox / "m.onnx")
        assert drop is not None
        _only((RejectedModel,), lambda: intake.verify(drop))
        drop.part.unlink(missing_ok=True)
        assert list(inbox.iterdir()) == [] and list(incoming.iterdir()) == []

    run()
    count.report()


# -- the inference socket's frames ---------------------------------------------------------------
def test_fuzz_wire_frames() -> None:
    count = Count("inference frames (split_frames, parse_head, unpack_tensors)")
    valid = wire.request(wire.INFER, 7, {"obs": __import__("numpy").zeros((1, 48), "float32")})

    @FUZZ
    @given(
        st.binary(max_size=200)
        | st.builds(lambda cut, junk: valid[:cut] + junk, st.integers(0, len(valid)), st.binary(max_size=16))
    )
    def run(data: bytes) -> None:
        count()
        buf = bytearray(data)
        frames = _only((ProtocolError,), lambda: wire.split_frames(buf)) or []
        for body in [data[4:], *frames]:
            _only((ProtocolError,), lambda b=body: wire.parse_head(b))
            _only((ProtocolError,), lambda b=body: wire.unpack_tensors(memoryview(b), 5))

    run()
    count.report()


# -- the control socket ---------------------------------------------------------------------------
@pytest.fixture
def control() -> Iterator[tuple[Path, Path]]:
    """A real ControlServer whose 'coordinator' answers every request with ok."""
    with tempfile.TemporaryDirectory(prefix="fz") as d:
        events: queue.Queue[ControlRequest[Request]] = queue.Queue()
        incoming = Path(d) / "incoming"
        server = ControlServer(Path(d) / "c.sock", incoming, events.put, parse_request, Authority("no-such-group"))
        server.start()
        done = threading.Event()

        def coordinator() -> None:
            while not done.is_set():
                try:
                    ev = events.get(timeout=0.05)
                except queue.Empty:
                    continue
                if isinstance(ev.request, DeployFile):
                    ev.request.path.unlink(missing_ok=True)
                ev.reply.put({"ok": True})

        t = threading.Thread(target=coordinator, name="fuzz-coordinator")
        t.start()
        try:
            yield server.path, incoming
        finally:
            done.set()
            t.join(5)
            server.stop()


def test_fuzz_control_requests(control: tuple[Path, Path]) -> None:
    path, incoming = control
    count = Count("control socket requests")
    requests = (
        st.binary(max_size=200)
        | json_values.map(lambda v: json.dumps(v).encode())
        | _mutations({"cmd": "deploy", "size": 3, "version": "v"}).map(lambda v: json.dumps(v).encode())
    )

    @FUZZ
    @given(requests, st.binary(max_size=8))
    def run(line: bytes, tail: bytes) -> None:
        count()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(path))
            try:
                s.sendall(line.replace(b"\n", b" ") + b"\n" + tail)
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass
            reply = json.loads(s.makefile("rb").readline())
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool)
        if not reply["ok"]:
            assert reply["error"]
        assert list(incoming.glob("*")) == []  # nothing left behind

    run()
    count.report()


def test_errors_are_the_projects() -> None:
    assert issubclass(SignatureRejected, ProtocolError) and issubclass(ProtocolError, AgentError)
