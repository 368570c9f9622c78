"""The coordinator: the daemon (composition root), the candidate pipeline, the gate, activation, the state store."""
