"""Per-board agent configs, systemd unit, Mosquitto config + ACL, MCU firmware templates."""
