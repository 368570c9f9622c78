"""The wire contract's public name: `agent.protocol` is what controllers and the cloud side import.
It lives in agent.contract.protocol; this module re-exports it unchanged."""

from agent.contract import protocol as _contract
from agent.contract.protocol import *  # noqa: F403

__all__ = _contract.__all__
