"""Everything the coordinator's queue carries: one typed union, dispatched in one place
(`Daemon._dispatch`). Each producer defines its own messages; this module names them together.

    paho's thread (agent.delivery.mqtt_link)   Connected, Disconnected, MessageArrived, Published
    the control socket (agent.system.control)  ControlRequest
    the file watcher (agent.system.inbox)      FileDropped, ReloadRequested
    signal handlers (agent.system.service)     StopRequested, ReloadRequested
    the pipeline thread (pipeline, scheduler)  StageReached, DownloadProgress, BuildProgressed,
                                               Notify, PipelineDone
    the operator thread (control_requests)     OperatorLoaded
    the coordinator itself                     Tick (the queue was quiet for a tick)"""

from __future__ import annotations

from dataclasses import dataclass

from agent.coordinator.control_requests import OperatorLoaded
from agent.coordinator.pipeline import BuildProgressed, DownloadProgress, Notify, StageReached
from agent.coordinator.scheduler import PipelineDone
from agent.delivery.mqtt_link import Connected, Disconnected, MessageArrived, Published
from agent.system.control import ControlRequest, Request
from agent.system.inbox import FileDropped
from agent.system.reload import ReloadRequested
from agent.system.service import StopRequested


@dataclass(frozen=True)
class Tick:
    """Nothing arrived for a tick: the periodic work runs anyway."""


Event = (
    Connected
    | Disconnected
    | MessageArrived
    | Published
    | ControlRequest[Request]
    | FileDropped
    | ReloadRequested
    | StopRequested
    | StageReached
    | DownloadProgress
    | BuildProgressed
    | Notify
    | PipelineDone
    | OperatorLoaded
    | Tick
)
