"""How a model arrives: the MQTT link, the resumable S3 download (in a child), the ONNX check (in a child)."""
