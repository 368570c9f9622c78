"""The Python API for the end of a training job (`from cloud import Fleet`); `fleet publish` uses it.

ann = Fleet.from_config("fleet.toml").publish("policy.onnx", channel="walk", version="v42",
                                              golden="golden.npz", canary=["go2-03"], soak="10m")
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.contract.protocol import Announcement
from agent.errors import PublishError
from cloud.config import FleetConfig, config_path, load
from cloud.duration import parse_duration

log = logging.getLogger(__name__)


class Fleet:
    """One fleet config's S3 bucket and broker."""

    def __init__(self, cfg: FleetConfig) -> None:
        self.cfg = cfg
        self.rollout: str | None = None  # the id of the rollout the last publish started

    @classmethod
    def from_config(cls, path: str | Path | None = None) -> Fleet:
        """The TOML config at `path` (default: $FLEET_CONFIG, then ./fleet.toml); ConfigError naming the key."""
        return cls(load(config_path(None if path is None else str(path))))

    def publish(  # noqa: PLR0913 (the training job's API takes `fleet publish`'s options)
        self,
        model: str | Path,
        *,
        channel: str,
        version: str | None = None,
        golden: str | Path | None = None,
        deploy_config: str | Path | None = None,
        latency_budget_us: int | None = None,
        golden_atol: float | None = None,
        golden_rtol: float | None = None,
        sign_key: str | Path | None = None,
        canary: list[str] | str | None = None,
        canary_fraction: float | None = None,
        target: list[str] | str | None = None,
        soak: str | float | None = None,
        note: Callable[[str], None] = log.warning,
    ) -> Announcement:
        """Check the ONNX (and golden file, deploy config), upload, announce on `channel`; the
        announcement sent (`.to_json()` for its JSON). PublishError, or Unreachable, when it could
        not be; `note` hears what the user should know that is no error.

        With `canary` (device ids), `canary_fraction` (of the channel's devices, or of the `target`
        groups') or `target` (device groups of the config), it starts a staged rollout instead: the
        announcement names those devices only, and `fleet collect` promotes it to the channel
        after `soak` (a duration, "10m", or seconds; default 10 minutes) or halts it
        (docs/cloud.md). Its id is then in `self.rollout`."""
        from cloud.publish import deploy_config_extra

        model = Path(model)
        extra: dict[str, Any] = {
            k: v
            for k, v in (
                ("latency_budget_us", latency_budget_us),
                ("golden_atol", golden_atol),
                ("golden_rtol", golden_rtol),
            )
            if v is not None
        }
        if deploy_config is not None:
            extra.update(deploy_config_extra(Path(deploy_config), model))
            if "lin_vel" in extra["deploy_config"].get("observations", []):
                from agent.go2.simgate import LIN_VEL_NOTE

                note(f"this policy needs {LIN_VEL_NOTE}")
        key = None if sign_key is None else Path(sign_key)

        def send(targets: list[str] | None) -> Announcement:
            from cloud.publish import publish

            g = None if golden is None else Path(golden)
            return publish(
                self.cfg, model, channel=channel, version=version, golden=g, extra=extra, sign_key=key, targets=targets
            )

        self.rollout = None
        if canary is None and canary_fraction is None and target is None:
            if soak is not None:
                raise PublishError("a soak needs canaries: give canary, canary_fraction or target")
            return send(None)
        return self._staged(
            send=send,
            key=key,
            channel=channel,
            version=version or model.stem,
            canary=_names(canary),
            fraction=canary_fraction,
            target=_names(target),
            soak=soak,
        )

    def _staged(
        self,
        *,
        send: Callable[[list[str] | None], Announcement],
        key: Path | None,
        channel: str,
        version: str,
        canary: list[str] | None,
        fraction: float | None,
        target: list[str] | None,
        soak: str | float | None,
    ) -> Announcement:
        from cloud.rollout_driver import choose_canaries, open_db, start

        soak_s = _seconds(soak)
        db = open_db(self.cfg)
        try:
            canaries = choose_canaries(self.cfg, db, channel, version, canary=canary, fraction=fraction, target=target)
            ann, self.rollout = start(
                self.cfg, db, channel=channel, publish=send, canaries=canaries, soak_s=soak_s, sign_key=key
            )
        finally:
            db.close()
        return ann


DEFAULT_SOAK_S = 600.0


def _names(value: list[str] | str | None) -> list[str] | None:
    """A list, or a comma-separated string as on the command line."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _seconds(soak: str | float | None) -> float:
    if soak is None:
        return DEFAULT_SOAK_S
    try:
        seconds = parse_duration(soak) if isinstance(soak, str) else float(soak)
    except ValueError as err:
        raise PublishError(f"soak: {err}") from None
    if seconds <= 0:
        raise PublishError(f"soak: {soak!r} must be positive")
    return seconds
