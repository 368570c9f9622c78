"""The contract shared with cloud/: wire formats, MQTT set-up, signatures, TOML, hashes, ONNX I/O."""
