"""edge-agent: the on-device side of the fleet (console script `agent`)."""

__version__ = "0.1.0"
