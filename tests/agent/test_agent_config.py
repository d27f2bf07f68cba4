"""agent.toml: strict keys, types, paths; the shipped per-board configs load."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from edgepack.agent.config import ConfigError, load_config, parse_config, write_config
from edgepack.agent.profiles import load_profile

BASE = 'device_id = "d1"\ntarget = "rpi4"\ndata_dir = "data"\ntrusted_keys = ["keys/fleet.pub"]\n'


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_minimal_config_resolves_paths_against_its_folder(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.device_id == "d1" and cfg.fleet == "default" and cfg.groups == ()
    assert cfg.data_dir == str(tmp_path / "data")
    assert cfg.trusted_keys == (str(tmp_path / "keys" / "fleet.pub"),)
    assert cfg.socket_path == tmp_path / "data" / "agent.sock"
    assert cfg.broker_config().url == "mqtt://127.0.0.1:1883"
    assert cfg.transfer.window == 16 and cfg.health.max_crashes == 3


@pytest.mark.parametrize("text, key", [
    (BASE + "colour = 1\n", "colour"),
    (BASE + "[broker]\nurl = 'mqtt://x'\nhots = 'y'\n", "broker.hots"),
    (BASE + "[transfer]\nwindow_size = 4\n", "transfer.window_size"),
    (BASE + "[nonsense]\na = 1\n", "nonsense"),
])
def test_unknown_key_names_file_and_key(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and f"'{key}'" in str(e.value)
    assert e.value.context["key"] == key


@pytest.mark.parametrize("text, needle", [
    (BASE + "[transfer]\nwindow = 'eight'\n", "transfer.window"),
    (BASE + "[transfer]\nwindow = 0\n", "transfer.window"),
    (BASE + "allow_unsigned = 'yes'\n", "allow_unsigned"),
    (BASE + "[serve]\nhttp = '0.0.0.0:8080'\n", "loopback"),
    (BASE + "[broker]\nurl = 'http://x'\n", "broker.url"),
    ('target = "rpi4"\ndata_dir = "d"\nallow_unsigned = true\n', "device_id"),
    ('device_id = "a/b"\ntarget = "rpi4"\ndata_dir = "d"\nallow_unsigned = true\n', "a/b"),
    ('device_id = "d1"\ntarget = "rpi4"\ndata_dir = "d"\n', "trusted_keys"),
])
def test_bad_values_are_explained(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(_write(tmp_path, text))
    assert needle in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="edgepack agent init"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "device_id = \n"))


def test_write_config_round_trips(tmp_path):
    out = write_config(tmp_path / "etc" / "agent.toml", device_id="pi-kitchen", target="rpi4",
                       board="rpi4", data_dir=str(tmp_path / "var"), groups=["rpi4-fleet"],
                       trusted_keys=[str(tmp_path / "fleet.pub")],
                       broker={"url": "mqtts://broker:8883", "username": "u", "password": "p"},
                       transfer={"window": 4}, serve={"http": "127.0.0.1:8765"})
    cfg = load_config(out)
    assert cfg.broker_config().tls and cfg.broker_config().port == 8883
    assert cfg.broker.username == "u" and cfg.transfer.window == 4
    assert cfg.groups == ("rpi4-fleet",) and cfg.serve.http == "127.0.0.1:8765"
    assert not list(out.parent.glob(".*tmp"))
    with pytest.raises(ConfigError):  # a config that would not load is never written
        write_config(tmp_path / "bad.toml", device_id="x", target="rpi4", data_dir="d")
    assert not (tmp_path / "bad.toml").exists()


BOARDS = sorted(p.name[:-5] for p in
                (resources.files("edgepack.firmware_configs") / "agents").iterdir()
                if p.name.endswith(".toml"))


def test_every_board_is_shipped():
    assert BOARDS == ["jetson-orin-nano", "rpi-zero-2w", "rpi4", "rpi5", "x86-gateway"]


@pytest.mark.parametrize("board", BOARDS)
def test_board_configs_load(board):
    res = resources.files("edgepack.firmware_configs") / "agents" / f"{board}.toml"
    import tomllib

    cfg = parse_config(tomllib.loads(res.read_text()), f"agents/{board}.toml", base_dir="/etc")
    assert cfg.board == board
    load_profile(cfg.target)  # every board names a real target profile
    for t in cfg.compatible_targets:
        load_profile(t)
    assert cfg.broker_config().tls and cfg.broker.ca and not cfg.allow_unsigned


def test_systemd_unit_runs_the_console_script():
    unit = (resources.files("edgepack.firmware_configs") / "systemd" /
            "edgepack-agent.service").read_text()
    assert "edgepack-agent --config" in unit and "Restart=always" in unit
    assert "Type=notify" in unit and "WatchdogSec=" in unit
