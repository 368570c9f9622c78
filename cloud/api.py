"""The Python API for the end of a training job (`from cloud import Fleet`); `fleet publish` uses it.

ann = Fleet.from_config("fleet.toml").publish("policy.onnx", channel="walk", version="v42",
                                              golden="golden.npz")
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.contract.protocol import Announcement
from cloud.config import FleetConfig, config_path, load

log = logging.getLogger(__name__)


class Fleet:
    """One fleet config's S3 bucket and broker."""

    def __init__(self, cfg: FleetConfig) -> None:
        self.cfg = cfg

    @classmethod
    def from_config(cls, path: str | Path | None = None) -> Fleet:
        """The TOML config at `path` (default: $FLEET_CONFIG, then ./fleet.toml); ConfigError naming the key."""
        return cls(load(config_path(None if path is None else str(path))))

    def publish(
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
        note: Callable[[str], None] = log.warning,
    ) -> Announcement:
        """Check the ONNX (and golden file, deploy config), upload, announce on `channel`; the
        announcement sent (`.to_json()` for its JSON). PublishError, or Unreachable, when it could
        not be; `note` hears what the user should know that is no error."""
        from cloud.publish import deploy_config_extra, publish

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
        return publish(
            self.cfg,
            model,
            channel=channel,
            version=version,
            golden=None if golden is None else Path(golden),
            extra=extra,
            sign_key=None if sign_key is None else Path(sign_key),
        )
