"""``init_agent``: a device's agent.toml from the per-board defaults, as a library call."""

from __future__ import annotations

import pytest

from edgepack.agent.config import ConfigError, load_config
from edgepack.agent.mqtt import parse_broker_url
from edgepack.host.fleet.provision import init_agent


def test_init_agent_writes_a_config_that_loads(tmp_path, signing_key) -> None:
    _, pub = signing_key
    out = tmp_path / "etc" / "agent.toml"
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    setup = init_agent("rpi5", "pi-1", broker=parse_broker_url("mqtts://b.local", ca=str(ca)),
                       out=out, pub=[pub], data_dir=tmp_path / "var", groups=["g"],
                       fleet="home")
    cfg = load_config(out)
    assert setup.config == str(out) and setup.device_id == "pi-1" == cfg.device_id
    assert setup.groups == ("g",) and setup.fleet == "home" and setup.board == "rpi5"
    assert cfg.broker_config().tls and cfg.broker.ca == str(ca.resolve())
    assert setup.trusted_keys == (str(out.parent / "keys" / pub.name),)
    assert setup.to_json()["groups"] == ["g"]

    with pytest.raises(ConfigError) as e:
        init_agent("rpi5", "pi-1", broker="mqtt://b", out=out, pub=[pub])
    assert e.value.context["field"] == "force" and "`force=`" in str(e.value)
    with pytest.raises(ConfigError) as e:
        init_agent("rpi5", "pi-2", broker="mqtt://b", out=tmp_path / "other.toml")
    assert e.value.context["field"] == "pub"
    with pytest.raises(ConfigError) as e:
        init_agent("esp8266", "x", broker="mqtt://b", out=tmp_path / "x.toml",
                   allow_unsigned=True)
    assert e.value.context["field"] == "board" and "rpi-zero-2w" in str(e.value)
