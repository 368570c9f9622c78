"""Unitree's own simulator, headless, as its README runs it (../shared/go2/README.md): the Go2 MJCF,
timestep 0.005 s, `ChannelFactoryInitialize(domain, "lo")`, `UnitreeSdk2Bridge(model, data)`
imported from unitree_mujoco/simulate_python (never copied into this project), `mj_step` in real
time. The bridge imports pygame for a gamepad only: an empty module stands in. Every 10 steps the
base position goes to the trace (JSON lines), for the tests' assertions.

    python tests/unitree_bridge.py GO2_DATA DOMAIN TRACE [SECONDS]"""

from __future__ import annotations

import json
import signal
import sys
import time
import types
from pathlib import Path

TIMESTEP = 0.005


def main() -> int:
    data_dir, domain, trace = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    seconds = float(sys.argv[4]) if len(sys.argv) > 4 else float("inf")
    sys.path.insert(0, str(data_dir / "unitree_mujoco" / "simulate_python"))
    sys.modules.setdefault("pygame", types.ModuleType("pygame"))
    import mujoco
    from unitree_sdk2py.core.channel import ChannelFactoryInitialize
    from unitree_sdk2py_bridge import UnitreeSdk2Bridge

    model = mujoco.MjModel.from_xml_path(str(data_dir / "mjcf" / "scene_flat.xml"))
    data = mujoco.MjData(model)
    model.opt.timestep = TIMESTEP
    ChannelFactoryInitialize(domain, "lo")
    UnitreeSdk2Bridge(model, data)
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    with trace.open("a") as out:
        start, steps = time.perf_counter(), 0
        while not stop[0] and steps * TIMESTEP < seconds:
            mujoco.mj_step(model, data)
            steps += 1
            if steps % 10 == 0:
                x, y, z = (round(float(v), 4) for v in data.qpos[:3])
                out.write(json.dumps({"step": steps, "t": round(data.time, 3), "x": x, "y": y, "z": z}) + "\n")
                out.flush()
            delay = start + steps * TIMESTEP - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
