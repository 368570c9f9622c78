"""The exception tree. Every error carries enough context to be shown to a user as one line."""


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration is invalid; the message names the key."""


class ProtocolError(AgentError):
    """A payload does not follow the wire contract."""


class RejectedModel(AgentError):
    """A candidate model failed a pipeline stage; the message is the reason users see."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


class FetchError(RejectedModel):
    def __init__(self, reason: str) -> None:
        super().__init__("download", reason)


class DaemonNotRunning(AgentError):
    """`agent` commands that need the daemon raise this when its control socket does not answer."""
