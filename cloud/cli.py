"""`fleet`: the cloud-side command line. main() -> exit code."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from cloud.config import FleetConfig, config_path, load


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load(config_path(args.config))
        return int(args.func(cfg, args))
    except AgentError as err:
        print(f"fleet: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleet", description="Publish models to the robots and see the fleet.")
    p.add_argument("--config", help="TOML config (default: $FLEET_CONFIG, then ./fleet.toml)")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    c = sub.add_parser("publish", help="upload an ONNX model and announce it on a channel")
    c.add_argument("model", type=Path)
    c.add_argument("--channel", required=True)
    c.add_argument("--version", dest="model_version")
    c.add_argument("--golden", type=Path, help=".npz of inputs/<name> and outputs/<name> (README: Golden I/O)")
    c.add_argument("--deploy-config", type=Path, help="Go2 deploy config (TOML/JSON) carried in the manifest")
    c.set_defaults(func=cmd_publish)
    c = sub.add_parser("collect", help="store device status, events and telemetry (long-running)")
    c.set_defaults(func=cmd_collect)
    c = sub.add_parser("status", help="one row per device")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_status)
    c = sub.add_parser("events", help="lifecycle events, oldest first")
    c.add_argument("--device")
    c.add_argument("--limit", type=int, default=200)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_events)
    return p


def cmd_publish(cfg: FleetConfig, args: argparse.Namespace) -> int:
    from cloud.publish import publish

    extra = None
    if args.deploy_config is not None:
        from cloud.publish import deploy_config_extra

        extra = deploy_config_extra(args.deploy_config, args.model)
    ann = publish(cfg, args.model, args.channel, args.model_version, args.golden, extra)
    print(
        json.dumps(
            {
                "channel": ann.channel,
                "sequence": ann.sequence,
                "issued_at": ann.issued_at,
                "manifest": ann.manifest.to_json(),
            },
            indent=2,
        )
    )
    return 0


def cmd_collect(cfg: FleetConfig, _args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cloud.collect import Collector

    return Collector(cfg).run()


def _db(cfg: FleetConfig) -> Any:
    from cloud.fleetdb import FleetDB

    if not cfg.collector.db.exists():
        raise AgentError(f"no collector database at {cfg.collector.db}: is `fleet collect` running?")
    return FleetDB(cfg.collector.db)


def cmd_status(cfg: FleetConfig, args: argparse.Namespace) -> int:
    rows = _db(cfg).devices()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = (
        f"{'DEVICE':<16} {'ONLINE':<7} {'CHANNEL':<12} {'ACTIVE':<14} {'BACKEND':<22} {'AGENT':<7} "
        f"{'P50 µs':>7} {'P99 µs':>7}  LAST SEEN"
    )
    print(head)
    for r in rows:
        backend = f"{r['backend'] or '-'} {r['backend_version'] or ''}".strip()
        print(
            f"{r['device_id']:<16} {'yes' if r['online'] else 'no':<7} {r['channel'] or '-':<12} "
            f"{r['active_version'] or '-':<14} {backend:<22} {r['agent_version'] or '-':<7} "
            f"{_n(r['latency_p50_us']):>7} {_n(r['latency_p99_us']):>7}  {_ago(r['last_seen'])}"
        )
    return 0


def cmd_events(cfg: FleetConfig, args: argparse.Namespace) -> int:
    events = _db(cfg).events(args.device, args.limit)
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    for e in events:
        when = time.strftime("%H:%M:%S", time.localtime(e["ts"]))
        what = f"{e.get('version', '')} {e.get('state', '')}".strip() if e["kind"] == "model_state" else e["kind"]
        print(f"{when} {e['device_id']:<16} {what:<24} {e.get('reason', '')}")
    return 0


def _n(v: Any) -> str:
    return "-" if v is None else str(v)


def _ago(ts: float) -> str:
    s = max(0, int(time.time() - ts))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"
