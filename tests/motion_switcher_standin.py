"""A stand-in for the Go2's motion switcher service, built from unitree_sdk2py's own RPC server
classes, answering on the same DDS RPC topics as the robot's (service "motion_switcher", API
1.0.0.1: CheckMode 1001, ReleaseMode 1003). Behaviour: `releases` (the sport mode lets go),
`refuses` (ReleaseMode answers an error code), `holds` (ReleaseMode says yes, the mode stays).
Prints each call it answers.

    python tests/motion_switcher_standin.py DOMAIN releases|refuses|holds"""

from __future__ import annotations

import json
import sys
import time

from unitree_sdk2py.comm.motion_switcher.motion_switcher_api import (
    MOTION_SWITCHER_API_ID_CHECK_MODE,
    MOTION_SWITCHER_API_ID_RELEASE_MODE,
    MOTION_SWITCHER_API_VERSION,
    MOTION_SWITCHER_SERVICE_NAME,
)
from unitree_sdk2py.core.channel import ChannelFactoryInitialize
from unitree_sdk2py.rpc.server import Server

REFUSED = 7004  # a non-zero code, as the robot answers a release it will not do


class MotionSwitcher(Server):
    def __init__(self, behaviour: str) -> None:
        super().__init__(MOTION_SWITCHER_SERVICE_NAME)
        self.behaviour = behaviour
        self.mode = "normal"  # the sport service holds the robot

    def Init(self) -> None:
        self._SetApiVersion(MOTION_SWITCHER_API_VERSION)
        self._RegistHandler(MOTION_SWITCHER_API_ID_CHECK_MODE, self.check, False)
        self._RegistHandler(MOTION_SWITCHER_API_ID_RELEASE_MODE, self.release, False)

    def check(self, _parameter: str) -> tuple[int, str]:
        print("CheckMode", self.mode, flush=True)
        return 0, json.dumps({"name": self.mode, "form": "0"})

    def release(self, _parameter: str) -> tuple[int, str]:
        print("ReleaseMode", self.behaviour, flush=True)
        if self.behaviour == "refuses":
            return REFUSED, ""
        if self.behaviour == "releases":
            self.mode = ""
        return 0, ""


def main() -> int:
    ChannelFactoryInitialize(int(sys.argv[1]), "lo")
    server = MotionSwitcher(sys.argv[2])
    server.Init()
    server.Start()
    print("ready", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
