"""The fleet wing: what runs beside a broker (publish/deploy, collector, storage, rollouts,
profiling jobs, simulator, dashboard, metrics, embedded broker)."""
