"""`agent go2 run | sim | arm | damp | command | status`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.errors import AgentError
from agent.go2.settings import Go2Config


def add_parser(sub: Any) -> None:
    p = sub.add_parser("go2", help="the Go2 controller and its MuJoCo simulator")
    g = p.add_subparsers(required=True, metavar="GO2_COMMAND")
    c = g.add_parser("run", help="run the controller (what go2-controller.service starts); passive until armed")
    c.set_defaults(func=cmd_run)
    c = g.add_parser("sim", help="a headless MuJoCo Go2 on the same DDS topics")
    c.add_argument("--mjcf", type=Path, required=True, help="scene MJCF (e.g. <go2 data>/mjcf/scene_flat.xml)")
    c.add_argument("--domain", type=int, help="DDS domain (default: [go2] domain)")
    c.add_argument("--interface", help="network interface (default: [go2] interface)")
    c.add_argument("--lockstep", action="store_true", help="one physics step per command (tests)")
    c.add_argument("--trace", type=Path, help="append the base position every 10 ticks (JSON lines)")
    c.add_argument("--duration", type=float, help="stop after this many simulated seconds")
    c.add_argument("--estop-at", type=float, help="hold the remote's e-stop key from this simulated time on")
    c.add_argument("--sport-state", action="store_true", help="also publish rt/sportmodestate (base velocity)")
    c.add_argument(
        "--count-ticks",
        action="store_true",
        help="count LowState.tick like the robot's firmware (default: 0, like Unitree's simulator)",
    )
    c.add_argument(
        "--sticks", type=float, nargs=4, metavar=("LX", "LY", "RX", "RY"), help="the remote's sticks, held (-1..1)"
    )
    c.set_defaults(func=cmd_sim)
    for name, helptext in (
        ("arm", "soft start to the default stance, then walk"),
        ("damp", "software e-stop: damping until armed again"),
    ):
        c = g.add_parser(name, help=helptext)
        c.set_defaults(func=cmd_simple, request=name)
    c = g.add_parser("command", help="the velocity command (vx vy wz)")
    c.add_argument("value", type=float, nargs=3)
    c.set_defaults(func=cmd_command)
    c = g.add_parser("status", help="the controller's mode, reason and model version")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_status)


def settings(cfg: AgentConfig) -> Go2Config:
    go2: Go2Config | None = getattr(cfg, "go2", None)
    return go2 if go2 is not None else Go2Config()


def control_socket(cfg: AgentConfig) -> Path:
    return settings(cfg).control_socket or cfg.socket.parent / "go2.sock"


def _logging(cfg: AgentConfig) -> None:
    logging.basicConfig(
        level=cfg.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def cmd_run(cfg: AgentConfig, _args: argparse.Namespace) -> int:
    _logging(cfg)
    from agent.go2.controller import Controller

    return Controller(settings(cfg), cfg.socket, control_socket(cfg)).run()


def cmd_sim(cfg: AgentConfig, args: argparse.Namespace) -> int:
    _logging(cfg)
    from agent.go2.sim import Simulator

    s = settings(cfg)
    domain = s.domain if args.domain is None else args.domain
    interface = (s.interface if args.interface is None else args.interface) or None
    return Simulator(
        args.mjcf,
        domain,
        interface,
        args.lockstep,
        trace=args.trace,
        duration_s=args.duration,
        estop_at_s=args.estop_at,
        sport_state=args.sport_state,
        count_ticks=args.count_ticks,
        sticks=tuple(args.sticks) if args.sticks else None,
    ).run()


def _ask(cfg: AgentConfig, request: dict[str, Any]) -> dict[str, Any]:
    from agent.system.control import call

    reply = call(control_socket(cfg), request, timeout=30.0)
    if not reply.get("ok"):
        raise AgentError(str(reply.get("error", "the controller refused")))
    return reply


def cmd_simple(cfg: AgentConfig, args: argparse.Namespace) -> int:
    print(json.dumps(_ask(cfg, {"cmd": args.request})))
    return 0


def cmd_command(cfg: AgentConfig, args: argparse.Namespace) -> int:
    print(json.dumps(_ask(cfg, {"cmd": "command", "value": list(args.value)})))
    return 0


def cmd_status(cfg: AgentConfig, args: argparse.Namespace) -> int:
    s = _ask(cfg, {"cmd": "status"})["status"]
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        lp = s.get("loop_period") or {}
        print(
            f"go2 controller: {s.get('mode')} ({s.get('reason')}); model {s.get('model_version') or '-'}; "
            f"command {s.get('command')}; tick {s.get('state_tick')}; loop period p50 {lp.get('p50_us')} µs, "
            f"p99 {lp.get('p99_us')} µs, {lp.get('over_2x')} over 2x"
        )
    return 0
