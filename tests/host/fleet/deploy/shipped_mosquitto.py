"""Run Mosquitto with the SHIPPED firmware_configs/mosquitto/ config and ACL on free ports.

Only what cannot work in a test is rewritten: paths under /etc/mosquitto/edgepack/ point to a
temporary directory, ports are free loopback ports, persistence is off, and the optional
username/password listener is switched on.
"""

from __future__ import annotations

import getpass
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from brokers import free_port, wait_port
from host_pki import CA, Issued, make_ca

SHIPPED = Path(__file__).resolve().parents[4] / "firmware_configs" / "mosquitto"


@dataclass
class SecureBroker:
    workdir: Path
    device_ca: CA
    operator_ca: CA
    rogue_ca: CA
    device_port: int
    operator_port: int
    password_port: int
    proc: subprocess.Popen | None = None
    certs: dict[str, Issued] = field(default_factory=dict)

    def device_cert(self, cn: str) -> Issued:
        if cn not in self.certs:
            self.certs[cn] = self.device_ca.issue(cn)
        return self.certs[cn]

    def log(self) -> str:
        return (self.workdir / "mosquitto.log").read_text(errors="replace")

    def stop(self) -> None:
        from brokers import stop_process

        stop_process(self.proc)


def start_shipped_mosquitto(workdir: Path, passwords: dict[str, str]) -> SecureBroker:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    workdir.mkdir(parents=True, exist_ok=True)
    device_ca, operator_ca = make_ca(workdir, "device-ca"), make_ca(workdir, "operator-ca")
    rogue_ca = make_ca(workdir / "rogue", "rogue-ca")
    server = device_ca.issue("localhost", server=True)
    shutil.copy(server.cert, workdir / "server.crt")
    shutil.copy(server.key, workdir / "server.key")
    shutil.copy(SHIPPED / "acl", workdir / "acl")
    passwd = workdir / "passwd"
    passwd.write_text("")
    for user, pw in passwords.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, pw], check=True,
                       capture_output=True)

    ports = free_port(), free_port(), free_port()
    conf = (SHIPPED / "mosquitto.conf").read_text()
    conf = conf.replace("/etc/mosquitto/edgepack/", f"{workdir}/")
    conf = conf.replace("persistence true", "persistence false")
    # run as the test user: started as root, mosquitto would switch to user "mosquitto", which
    # cannot enter pytest's private temporary directory
    conf = "user " + getpass.getuser() + "\n" + conf
    # the optional username/password block ships commented out: switch it on
    head, _, optional = conf.partition("# --- optional: username/password")
    optional = re.sub(r"^#(?=[a-z_]+ )", "", optional, flags=re.M)
    conf = head + "# --- optional: username/password" + optional
    for shipped, port in zip(("8883", "8884", "8885"), ports, strict=True):
        conf, n = re.subn(rf"^listener {shipped}$", f"listener {port} 127.0.0.1", conf,
                          flags=re.M)
        assert n == 1, f"the shipped mosquitto.conf has no 'listener {shipped}' line"
    (workdir / "mosquitto.conf").write_text(conf)

    log = open(workdir / "mosquitto.log", "ab")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen([exe, "-c", str(workdir / "mosquitto.conf")], stdout=log,
                            stderr=log)
    b = SecureBroker(workdir=workdir, device_ca=device_ca, operator_ca=operator_ca,
                     rogue_ca=rogue_ca, device_port=ports[0], operator_port=ports[1],
                     password_port=ports[2], proc=proc)
    try:
        for p in ports:
            if proc.poll() is not None:
                raise TimeoutError
            wait_port(p, timeout=5)
    except TimeoutError:
        time.sleep(0.2)
        b.stop()
        raise RuntimeError(f"mosquitto did not start with the shipped config:\n{b.log()}") \
            from None
    return b
