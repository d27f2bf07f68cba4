"""Device profiles (one TOML file per target), read by ``edgepack.agent.profiles``."""
