"""`agent`: the device-side command line. main() -> exit code."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import AgentConfig, config_path, load
from agent.contract import cli_errors
from agent.contract.cli_errors import EXIT_NOT_RUNNING
from agent.contract.cli_options import Parser, accept_everywhere, global_options, name_arg
from agent.errors import AgentError, DaemonNotRunning


def main(argv: list[str] | None = None) -> int:
    """Exit codes: agent.contract.cli_errors (0 done, 1 no, 2 bad request, 3 not running, 4 a
    service unreachable, 70 a bug)."""
    args = _parser().parse_args(argv)
    return cli_errors.run("agent", lambda: _command(args), args.debug)


def _command(args: argparse.Namespace) -> int:
    if args.func is cmd_doctor:  # doctor reports an invalid config as one of its checks
        return cmd_doctor(config_path(args.config), args)
    return int(args.func(load(config_path(args.config)), args))


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="agent", description="edge-agent: models from the fleet, served on this robot.")
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    c = sub.add_parser("run", help="run the daemon (what the systemd unit starts)")
    c.set_defaults(func=cmd_run)
    c = sub.add_parser("status", help="what the daemon is doing; exit 3 when it is not running")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_status)
    c = sub.add_parser("models", help="the model history with states and reasons")
    c.add_argument("--json", action="store_true")
    c.add_argument("--limit", type=int, default=20)
    c.set_defaults(func=cmd_models)
    c = sub.add_parser("deploy", help="put a local ONNX file through the same pipeline")
    c.add_argument("model", type=Path)
    c.add_argument("--version", dest="model_version", type=name_arg("--version"), help="default: local-<sha256>")
    c.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the outcome (0: don't)")
    c.add_argument(
        "--skip-check",
        action="append",
        default=[],
        choices=["sim"],
        help="force the model past this gate check (recorded as forced)",
    )
    c.add_argument("--deploy-config", type=Path, help="the Go2 deploy config (TOML/JSON) that goes with the model")
    c.set_defaults(func=cmd_deploy)
    c = sub.add_parser("activate", help="activate a staged or stored version (the manual policy's step)")
    c.add_argument("target_version", metavar="VERSION", type=name_arg("VERSION"))
    c.set_defaults(func=lambda cfg, a: _simple(cfg, {"cmd": "activate", "version": a.target_version}, "active"))
    c = sub.add_parser("rollback", help="go back to the previous stored model")
    c.set_defaults(func=lambda cfg, a: _simple(cfg, {"cmd": "rollback"}, "active"))
    c = sub.add_parser("pin", help="serve VERSION and stop following the channel")
    c.add_argument("target_version", metavar="VERSION", type=name_arg("VERSION"))
    c.set_defaults(func=lambda cfg, a: _simple(cfg, {"cmd": "pin", "version": a.target_version}, "pinned"))
    c = sub.add_parser("unpin", help="follow the channel again (catching up with what it announced meanwhile)")
    c.set_defaults(func=lambda cfg, a: _simple(cfg, {"cmd": "unpin"}, "unpinned"))
    c = sub.add_parser("doctor", help="check this machine: TensorRT/CUDA, GPU, memory, disk, state dir, broker, S3")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_doctor)
    from agent.go2.cli import add_parser as add_go2

    add_go2(sub)
    accept_everywhere(p, global_options("TOML config (default: $EDGE_AGENT_CONFIG, then /etc/edge-agent/agent.toml)"))
    return p


def cmd_doctor(config_file: Path, args: argparse.Namespace) -> int:
    from agent.system import doctor

    checks = doctor.run_doctor(config_file)
    print(json.dumps(doctor.to_json(checks), indent=2) if args.json else doctor.format_text(checks))
    return doctor.exit_code(checks)


def cmd_run(cfg: AgentConfig, args: argparse.Namespace) -> int:
    from agent.coordinator.daemon import Daemon
    from agent.proc import logsetup

    logsetup.setup(cfg.log_level)
    return Daemon(cfg, config_file=config_path(args.config)).run()


def _ask(cfg: AgentConfig, request: dict[str, Any], payload: Path | None = None) -> dict[str, Any]:
    from agent.system.control import call, reply_timeout

    reply = call(cfg.control_path, request, payload, timeout=reply_timeout(request["cmd"]) + 30)
    if not reply.get("ok"):
        raise AgentError(str(reply.get("error", "the daemon refused the request")))
    return reply


def cmd_status(cfg: AgentConfig, args: argparse.Namespace) -> int:
    try:
        status = _ask(cfg, {"cmd": "status"})["status"]
    except DaemonNotRunning as err:
        if args.json:
            print(json.dumps({"device_id": cfg.device_id, "state": "not running", "reason": str(err)}))
        else:
            print(f"edge-agent on {cfg.device_id} is not running: {err}.")
        return EXIT_NOT_RUNNING
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def format_status(s: dict[str, Any]) -> str:
    a, p, r, lat = s["active"], s["pending"], s["last_rejected"], s["latency_last_minute"]
    broker = "connected" if s["broker"]["connected"] else "NOT connected"
    lines = [
        f"edge-agent {s['agent_version']} on {s['device_id']}: {s['state']}, up {_dur(s['uptime_s'])}",
        f"  channel   {s['channel']}   backend {s['backend']} {s['backend_version']}",
        f"  broker    {broker} ({s['broker']['url']})",
    ]
    if s["broker"]["conflict"]:
        lines.append(f"  WARNING   {s['broker']['conflict']}")
    precision = f", {a['precision']}" if a and a.get("precision") else ""
    lines.append(
        f"  active    {a['version']} (sha256 {a['sha256'][:12]}{precision}, since {_when(a['activated_at'])})"
        if a
        else "  active    none yet"
    )
    if a and a.get("precision_note"):
        lines.append(f"  precision {a['precision_note']}")
    if p:
        downloading = p["stage"] == "downloading" and p["total_bytes"]
        pct = f" {100 * p['downloaded_bytes'] / p['total_bytes']:.0f}%" if downloading else ""
        lines.append(f"  pending   {p['version']}: {p['stage']}{pct} ({p['reason']})")
        b = p.get("build")
        if b:
            done = f" {b['percent']:.0f}%" if b["percent"] is not None else ""
            lines.append(f"  build     {b['stage']}{done}, {b['elapsed_s']:.0f} s so far (pid {b['pid']})")
    if s["watch"]:
        w = s["watch"]
        lines.append(
            f"  watching  {w['version']} for {w['remaining_s']:.0f} s more: {w['requests']} calls, "
            f"{w['errors']} errors, {w['nonfinite']} NaN/Inf, p99 {w['p99_us']} µs"
        )
    if s["pinned"]:
        lines.append(f"  pinned    to {s['pinned']}: not following the channel (`agent unpin`)")
    if s.get("operator"):
        lines.append(f"  operator  `agent {s['operator']['cmd']}`: loading {s['operator']['version']}")
    if s["staged"]:
        lines.append(f"  staged    {', '.join(s['staged'])} (`agent activate VERSION`)")
    if r:
        lines.append(f"  rejected  {r['version']} at {_when(r['at'])}: {r['reason']}")
    if s["last_rollback"]:
        b = s["last_rollback"]
        lines.append(f"  rolled back {b['version']} at {_when(b['at'])}: {b['reason']}")
    return "\n".join(lines + _service_lines(s, lat))


def _service_lines(s: dict[str, Any], lat: dict[str, int]) -> list[str]:
    """Serving, the outbox and the disk."""
    lines = [
        f"  latency   p50 {lat['p50_us']} µs, p99 {lat['p99_us']} µs over {lat['count']} calls in the last minute",
        f"  clients   {s['clients']} connected; {s['requests']} requests served, {s['request_errors']} errors",
    ]
    if s.get("serving"):
        v = s["serving"]
        cpus = ",".join(str(c) for c in v["cpus"])
        lines.append(f"  serving   process {v['pid']}, {v['scheduling']}, CPUs {cpus}")
    if s["outbox"]:
        lines.append(f"  outbox    {s['outbox']} events waiting for the broker")
    if s["disk"]["problem"]:
        lines.append(f"  disk      {s['disk']['free_mb']} MiB free: {s['disk']['problem']}")
    return lines


def cmd_models(cfg: AgentConfig, args: argparse.Namespace) -> int:
    from agent.coordinator.store import Store

    db = cfg.state_dir / "agent.db"
    if not db.exists():
        print("no models yet" if not args.json else "[]")
        return 0
    store = Store(cfg.state_dir, readonly=True)
    records = store.history(args.limit)
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2))
        return 0
    for r in records:
        precision = str(r.figures.get("precision") or "-")
        print(f"{r.id:>4}  {r.version:<20} {r.state.value:<12} {precision:<5} {_when(r.updated_at):<19}  {r.reason}")
    return 0


def cmd_deploy(cfg: AgentConfig, args: argparse.Namespace) -> int:
    path: Path = args.model
    if not path.is_file():
        raise AgentError(f"{path}: no such file")
    request = {"cmd": "deploy", "version": args.model_version or "", "size": path.stat().st_size, "name": path.name}
    if args.skip_check:
        request["skip_checks"] = sorted(set(args.skip_check))
    if args.deploy_config is not None:
        from agent.go2.deploy import load as load_deploy_config

        request["deploy_config"] = load_deploy_config(args.deploy_config).source
    reply = _ask(cfg, request, payload=path)
    print(f"deploying {reply['version']} (sha256 {reply['sha256'][:12]})")
    if args.wait <= 0:
        return 0
    return _wait_outcome(cfg, int(reply["id"]), args.wait)


def _simple(cfg: AgentConfig, request: dict[str, Any], what: str) -> int:
    reply = _ask(cfg, request)
    version = reply.get("version") or reply.get("was")
    print(f"{what}: {version}" if version else f"{what}")
    return 0


def _wait_outcome(cfg: AgentConfig, model_id: int, timeout: float) -> int:
    from agent.coordinator.store import Store

    store = Store(cfg.state_dir, readonly=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = store.get(model_id)
        # "staged" is an outcome only when the model waits there (manual policy, pinned); right
        # after the gate it is the moment before the swap.
        waits = rec.state.value == "staged" and rec.reason.startswith("waiting")
        if rec.state.value in ("active", "rejected", "rolled_back") or waits:
            print(f"{rec.version}: {rec.state.value} ({rec.reason})")
            return 0 if rec.state.value in ("active", "staged") else 1
        time.sleep(0.1)
    print(f"still in progress after {timeout:g} s; see `agent status`")
    return 1


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _dur(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
