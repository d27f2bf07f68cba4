"""The fleet wing: what runs beside a broker.

=====================  ==========================================================================
``api``                the Python front door: publish, deploy, fleet_status, devices, rollouts
``publish``            a bundle on the broker as retained chunks and a signed chunk table
``deploy``             the retained desired state that points a device or group at a bundle
``status``             what every device last reported (retained state and desired messages)
``provision``          a device's ``agent.toml`` from the per-board defaults
``storage/``           the fleet database: one repository per table, returning typed records
``collector/``         subscribes to the fleet and stores what devices report
``rollout/``           staged rollouts: plan, status, control, the engine and its actions
``dashboard/``         the JSON API and the pages over the database; ``metrics``: /metrics
``server``             ``fleet serve``: collector + rollout engine + dashboard from a ServeConfig
``broker``             the embedded MQTT broker for one-machine trials
``simulator``          many simulated devices; ``profiling``: on-device profiling jobs
=====================  ==========================================================================
"""
