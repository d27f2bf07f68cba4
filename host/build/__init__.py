"""The build wing: model in, signed bundle out (import, pre-flight, optimize, gate, choose, package)."""
