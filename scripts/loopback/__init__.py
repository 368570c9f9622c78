"""Real counterparts on loopback for the demo, the benchmarks and the tests: mosquitto and moto's S3
server on free ports, the agent and fleet as processes (each stopped by its id), a real systemd
notify socket, and sample policies (ONNX MLPs shaped like the Go2's). Nothing here is installed on a
robot: the demo and the benchmarks import it as `loopback`, the tests as `scripts.loopback`."""
