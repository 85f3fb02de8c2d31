"""Ray orchestration, the CLI, nightly retraining and serving: wires workers to the registry."""
