"""The reference Go2 controller: deploy config, observation/action mapping, safety, the DDS bridge to
the robot's low-level interface, a MuJoCo simulator on the same topics and the sim-in-the-loop gate.
MuJoCo, cyclonedds and unitree_sdk2py are optional (extra `go2`): import the modules that need them
only where they are used."""
