"""`fleet`: the cloud-side command line. main() -> exit code."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from agent.contract import cli_errors
from agent.contract.cli_options import Parser, accept_everywhere, global_options, name_arg, positive_int, tolerance
from agent.errors import AgentError
from cloud.config import FleetConfig, config_path, load
from cloud.duration import parse_duration


def main(argv: list[str] | None = None) -> int:
    """Exit codes: agent.contract.cli_errors (0 done, 2 bad request, 4 a service unreachable, 70 a bug)."""
    args = _parser().parse_args(argv)
    return cli_errors.run("fleet", lambda: _command(args), args.debug)


def _command(args: argparse.Namespace) -> int:
    cfg = None if args.func is cmd_keygen else load(config_path(args.config))  # keygen needs no config
    return int(args.func(cfg, args))


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="fleet", description="Publish models to the robots and see the fleet.")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    c = sub.add_parser("publish", help="upload an ONNX model and announce it on a channel")
    c.add_argument("model", type=Path)
    c.add_argument("--channel", required=True, type=name_arg("--channel"))
    c.add_argument("--version", dest="model_version", type=name_arg("--version"))
    c.add_argument("--golden", type=Path, help=".npz of inputs/<name>, outputs/<name> (docs/how-it-works.md)")
    c.add_argument(
        "--latency-budget-us", type=positive_int, help="the gate's p99 budget for this model (default: the device's)"
    )
    c.add_argument("--golden-atol", type=tolerance, help="absolute tolerance against the golden outputs")
    c.add_argument("--golden-rtol", type=tolerance, help="relative tolerance against the golden outputs")
    c.add_argument("--sign-key", type=Path, help="Ed25519 private key from `fleet keygen`: sign the announcement")
    c.add_argument("--deploy-config", type=Path, help="Go2 deploy config (TOML/JSON) carried in the manifest")
    _staged_options(c)
    c.set_defaults(func=cmd_publish)
    _rollout_commands(sub)
    c = sub.add_parser("rollback", help="announce an earlier version again (a new sequence number)")
    c.add_argument("--channel", required=True, type=name_arg("--channel"))
    c.add_argument("--to", required=True, dest="to_version", metavar="VERSION", type=name_arg("--to"))
    c.add_argument("--sign-key", type=Path, help="Ed25519 private key from `fleet keygen`: sign the announcement")
    c.set_defaults(func=cmd_rollback)
    c = sub.add_parser("keygen", help="make an Ed25519 signing key; prints the public key for agents' trusted_keys")
    c.add_argument("key", type=Path, help="where to write the private key (PEM, mode 0600; never overwritten)")
    c.set_defaults(func=cmd_keygen)
    c = sub.add_parser("collect", help="store device status, events and telemetry (long-running)")
    c.set_defaults(func=cmd_collect)
    _view_commands(sub)
    accept_everywhere(p, global_options("TOML config (default: $FLEET_CONFIG, then ./fleet.toml)"))
    return p


def _view_commands(sub: Any) -> None:
    """What reads the collector's database: status, events, latency, compare, the dashboard."""
    c = sub.add_parser("status", help="one row per device")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_status)
    c = sub.add_parser("events", help="lifecycle events, oldest first")
    c.add_argument("--device", type=name_arg("--device"))
    c.add_argument("--limit", type=int, default=200)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_events)
    c = sub.add_parser("latency", help="latency per version and device, from the merged histograms")
    c.add_argument("--channel", type=name_arg("--channel"))
    c.add_argument("--version", dest="model_version", type=name_arg("--version"))
    c.add_argument("--device", type=name_arg("--device"))
    _since(c)
    c.add_argument("--json", action="store_true")
    c.add_argument("--plot", type=Path, metavar="FILE", help="p50/p99 over time per version, to .png or .svg")
    c.set_defaults(func=cmd_latency)
    c = sub.add_parser("compare", help="two versions side by side on the devices that ran both")
    c.add_argument("old", metavar="V1", type=name_arg("V1"))
    c.add_argument("new", metavar="V2", type=name_arg("V2"))
    c.add_argument("--channel", type=name_arg("--channel"))
    _since(c)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compare)
    c = sub.add_parser("serve", help="the dashboard in the browser, over the collector's database (long-running)")
    c.add_argument("--listen", metavar="HOST:PORT", help="default: [serve] listen, 127.0.0.1:8080")
    c.set_defaults(func=cmd_serve)


def _staged_options(c: argparse.ArgumentParser) -> None:
    staged = c.add_argument_group("staged rollout", "announce to canaries first; `fleet collect` promotes or halts")
    staged.add_argument("--canary", type=name_list("--canary"), metavar="DEVICE[,DEVICE...]")
    staged.add_argument("--canary-fraction", type=fraction, metavar="F", help="of the channel's (or groups') devices")
    staged.add_argument("--target", type=name_list("--target"), metavar="GROUP[,GROUP...]", help="[device_groups]")
    staged.add_argument("--soak", type=duration, metavar="DURATION", help="after every canary runs it (default 10m)")


def _rollout_commands(sub: Any) -> None:
    c = sub.add_parser("rollouts", help="staged rollouts: state, canaries, why halted")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_rollouts)
    c = sub.add_parser("promote", help="promote a staged rollout to its channel now")
    c.add_argument("rollout", metavar="ROLLOUT", type=name_arg("ROLLOUT"))
    c.set_defaults(func=cmd_promote)
    c = sub.add_parser("halt", help="halt a staged rollout: its canaries roll back")
    c.add_argument("rollout", metavar="ROLLOUT", type=name_arg("ROLLOUT"))
    c.set_defaults(func=cmd_halt)


def cmd_publish(cfg: FleetConfig, args: argparse.Namespace) -> int:
    from cloud.api import Fleet

    fleet = Fleet(cfg)
    ann = fleet.publish(
        args.model,
        channel=args.channel,
        version=args.model_version,
        golden=args.golden,
        deploy_config=args.deploy_config,
        latency_budget_us=args.latency_budget_us,
        golden_atol=args.golden_atol,
        golden_rtol=args.golden_rtol,
        sign_key=args.sign_key,
        canary=args.canary,
        canary_fraction=args.canary_fraction,
        target=args.target,
        soak=args.soak,
        note=lambda text: print(f"fleet: note: {text}", file=sys.stderr),
    )
    _print_announcement(ann, fleet.rollout)
    return 0


def name_list(option: str) -> Any:
    """An argparse `type`: comma-separated names."""
    one = name_arg(option)

    def parse(value: str) -> list[str]:
        return [one(v.strip()) for v in value.split(",") if v.strip()]

    return parse


def fraction(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        f = -1.0
    if not 0 < f <= 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a fraction in (0, 1], e.g. 0.2")
    return f


def cmd_rollouts(cfg: FleetConfig, args: argparse.Namespace) -> int:
    from cloud.rollout_driver import Driver
    from cloud.rolloutdb import RolloutDB

    db = _db(cfg)
    driver = Driver(cfg, db)
    rows = [(r, driver.observed(r)) for r in RolloutDB(db).all()]
    if args.json:
        out = [{**r.to_json(), "observed": {d: o.to_json() for d, o in seen.items()}} for r, seen in rows]
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'ROLLOUT':<24} {'CHANNEL':<12} {'VERSION':<14} {'STATE':<10} {'CANARIES':<24} REASON")
    for r, seen in rows:
        canaries = ",".join(f"{d}{'*' if seen[d].active else '!' if seen[d].failed else ''}" for d in r.canaries)
        print(f"{r.id:<24} {r.channel:<12} {r.version:<14} {r.state:<10} {canaries:<24} {r.reason}")
    if not rows:
        print("(no rollouts: `fleet publish --canary ...` starts one)")
    return 0


def cmd_promote(cfg: FleetConfig, args: argparse.Namespace) -> int:
    return _by_hand(cfg, args.rollout, "promote")


def cmd_halt(cfg: FleetConfig, args: argparse.Namespace) -> int:
    return _by_hand(cfg, args.rollout, "halt")


def _by_hand(cfg: FleetConfig, rollout_id: str, what: str) -> int:
    from cloud.rollout_driver import Driver
    from cloud.rolloutdb import RolloutDB

    db = _db(cfg)
    r = RolloutDB(db).get(rollout_id)
    if r is None:
        raise AgentError(f"no rollout {rollout_id!r} (see `fleet rollouts`)")
    driver = Driver(cfg, db)
    reason = f"{'promoted' if what == 'promote' else 'halted'} by hand (fleet {what})"
    done = driver.promote(r, reason) if what == "promote" else driver.halt(r, reason)
    r = RolloutDB(db).get(rollout_id) or r  # as it is now: done, or superseded just now
    if not done:
        raise AgentError(f"rollout {rollout_id} is {r.state}, not canary ({r.reason}): nothing to {what}")
    print(f"{rollout_id}: {r.state}: {r.reason}")
    return 0


def _since(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", type=duration, default=24 * 3600.0, metavar="DURATION", help="e.g. 90m, 24h, 7d")


def duration(value: str) -> float:
    """An argparse `type`: a duration (cloud.duration), in seconds."""
    try:
        return parse_duration(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def cmd_rollback(cfg: FleetConfig, args: argparse.Namespace) -> int:
    from cloud.publish import rollback

    _print_announcement(rollback(cfg, args.channel, args.to_version, sign_key=args.sign_key))
    return 0


def _print_announcement(ann: Any, rollout: str | None = None) -> None:
    out = {
        "channel": ann.channel,
        "sequence": ann.sequence,
        "issued_at": ann.issued_at,
        "manifest": ann.manifest.to_json(),
        "signature": ann.signature,
    }
    if rollout is not None:
        out.update(targets=list(ann.targets), rollout=rollout)
    print(json.dumps(out, indent=2))


def cmd_keygen(_cfg: FleetConfig | None, args: argparse.Namespace) -> int:
    from agent.contract.signing import generate, key_id, public_b64

    public = generate(args.key)
    pub = public_b64(public)
    args.key.with_name(args.key.name + ".pub").write_text(pub + "\n")
    print(f"wrote {args.key} (private, keep it on the publishing machine) and {args.key}.pub")
    print(f"key id {key_id(public)}; on each robot, in /etc/edge-agent/agent.toml:")
    print(f'[security]\ntrusted_keys = ["{pub}"]')
    return 0


def cmd_collect(cfg: FleetConfig, _args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cloud.collect import Collector

    return Collector(cfg).run()


def cmd_serve(cfg: FleetConfig, args: argparse.Namespace) -> int:
    from cloud.dashboard.listen import check_listen

    host, port = check_listen(args.listen or cfg.serve.listen, cfg.serve.allow_remote)
    _db(cfg).close()  # fails early, and plainly, when there is no database yet
    try:
        import uvicorn

        from cloud.dashboard.app import create_app
    except ImportError as err:
        raise AgentError(f"fleet serve needs the cloud extra ({err.name}): pip install 'edge-agent[cloud]'") from None
    app = create_app(cfg)
    print(f"fleet: the dashboard is at http://{host}:{port}/", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0


def _db(cfg: FleetConfig) -> Any:
    from cloud.fleetdb import open_existing

    return open_existing(cfg.collector.database)


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
        what = f"{e.get('version', '')} {e.get('state') or e['kind']}".strip()
        print(f"{when} {e['device_id']:<16} {what:<24} {e.get('reason') or _details(e)}")
    return 0


def cmd_latency(cfg: FleetConfig, args: argparse.Namespace) -> int:
    from cloud import latency

    since = time.time() - args.since
    rows = _db(cfg).latency_rows(since=since, channel=args.channel, version=args.model_version, device_id=args.device)
    if args.plot is not None:
        from cloud.plot import bin_seconds, plot_latency

        plot_latency(latency.series(rows, bin_seconds(args.since)), args.plot, _window_title(args.since))
        print(f"wrote {args.plot}", file=sys.stderr)
    groups = latency.by_version(rows)
    if args.json:
        print(json.dumps({"since": since, "versions": [g.to_json() for g in groups]}, indent=2))
        return 0
    print(f"{'CHANNEL':<12} {'VERSION':<14} {'DEVICE':<16} {_PERCENTILE_HEAD}")
    for g in groups:
        print(f"{g.channel or '-':<12} {g.version or '-':<14} {'(all)':<16} {_percentiles(g.fleet)}")
        for device, p in sorted(g.devices.items()):
            print(f"{'':<12} {'':<14} {device:<16} {_percentiles(p)}")
    if not groups:
        print(f"(no latency history since {time.strftime('%Y-%m-%d %H:%M', time.localtime(since))})")
    return 0


def cmd_compare(cfg: FleetConfig, args: argparse.Namespace) -> int:
    from cloud import latency

    rows = _db(cfg).latency_rows(since=time.time() - args.since, channel=args.channel)
    result = latency.compare(rows, args.old, args.new)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    if not result.devices:
        raise AgentError(f"no device ran both {args.old} and {args.new} in the window (--since, --channel)")
    print(f"{'DEVICE':<16} {'VERSION':<14} {_PERCENTILE_HEAD}")
    for device, (a, b) in [("(all)", result.fleet), *sorted(result.devices.items())]:
        print(f"{device:<16} {args.old:<14} {_percentiles(a)}")
        print(f"{'':<16} {args.new:<14} {_percentiles(b)}")
        ratio = latency.ratios(a, b)
        figures = " ".join(f"{_ratio(ratio[k]):>{w}}" for k, w in _RATIO_COLUMNS)
        print(f"{'':<16} {'ratio':<14} {'':>9} {figures}")
    return 0


_PERCENTILE_HEAD = f"{'CALLS':>9} {'P50 µs':>8} {'P90 µs':>8} {'P99 µs':>8} {'P99.9 µs':>9} {'MAX µs':>8}"
_RATIO_COLUMNS = (("p50_us", 8), ("p90_us", 8), ("p99_us", 8), ("p999_us", 9), ("max_us", 8))


def _percentiles(p: Any) -> str:
    return f"{p.calls:>9} {p.p50_us:>8} {p.p90_us:>8} {p.p99_us:>8} {p.p999_us:>9} {p.max_us:>8}"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _window_title(since_s: float) -> str:
    return f"fleet latency, last {since_s / 3600:g} h to {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"


_HEADER = {"protocol", "type", "id", "device_id", "kind", "ts", "received", "version", "state", "model_id"}


def _details(event: dict[str, Any]) -> str:
    """The fields of an event that has no reason (build progress, engine built, ...), as k=v."""
    return " ".join(f"{k}={v}" for k, v in event.items() if k not in _HEADER and v not in (None, "", {}))


def _n(v: Any) -> str:
    return "-" if v is None else str(v)


def _ago(ts: float) -> str:
    s = max(0, int(time.time() - ts))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"
