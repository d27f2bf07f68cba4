"""mqtts:// with a private CA, a client certificate (mutual TLS) and a password file."""

from __future__ import annotations

import datetime
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from agent_helpers import AgentProcess, Watcher, agent_config, deploy, free_port
from brokers import start_mosquitto

from edgepack.host.fleet.client import SyncClient

pytestmark = pytest.mark.broker


def _cert(subject: str, key, issuer=None, issuer_key=None, *, ca: bool = False, san=None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer.subject if issuer else name).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        import ipaddress

        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(san))]), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def tls_broker():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d = Path(tempfile.mkdtemp(prefix="edgepack-tls-"))
    d.chmod(0o755)  # mosquitto reads the files after dropping to its own user

    def write(name: str, key, cert) -> None:
        (d / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (d / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        for f in (f"{name}.key", f"{name}.crt"):
            (d / f).chmod(0o644)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("edgepack test CA", ca_key, ca=True)
    write("ca", ca_key, ca)
    for name, san in (("server", "127.0.0.1"), ("device", None)):
        k = ec.generate_private_key(ec.SECP256R1())
        write(name, k, _cert(name, k, ca, ca_key, san=san))
    pw = d / "passwd"
    pw.write_text("dev1:s3cret\n")
    subprocess.run(["mosquitto_passwd", "-U", str(pw)], check=True, capture_output=True)
    pw.chmod(0o644)
    port = free_port()
    broker = start_mosquitto(extra_conf=(
        f"listener {port} 127.0.0.1\ncafile {d}/ca.crt\ncertfile {d}/server.crt\n"
        f"keyfile {d}/server.key\nrequire_certificate true\npassword_file {pw}\n"
        "per_listener_settings false\n"))
    broker.tls_port, broker.dir = port, d
    from brokers import wait_port

    wait_port(port)
    yield broker
    broker.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto-clients needed")
def test_deploy_over_mutual_tls(tmp_path, tls_broker, fleet, bundles, keys):
    d = tls_broker.dir
    url = f"mqtts://127.0.0.1:{tls_broker.tls_port}"
    cfg = agent_config(tmp_path / "dev1", url, fleet, pub=keys.pub, broker={
        "url": url, "ca": str(d / "ca.crt"), "cert": str(d / "device.crt"),
        "key": str(d / "device.key"), "username": "dev1", "password": "s3cret"})
    agent = AgentProcess(cfg).start()
    try:
        with Watcher(tls_broker.url, fleet) as watcher:  # the host side uses the plain listener
            watcher.wait_state(lambda s: s.get("online"), timeout=20)
            bid, dep = deploy(tls_broker.url, fleet, bundles.get("1.0.0"), key=keys.key)
            watcher.wait_event("installed", dep)
            watcher.wait_active(bid)
    finally:
        assert agent.stop() == 0
    # a wrong password is refused: the agent keeps retrying with backoff, never crashes
    from edgepack.agent.mqtt import parse_broker_url

    bad = parse_broker_url(url, ca=str(d / "ca.crt"), cert=str(d / "device.crt"),
                           key=str(d / "device.key"), username="dev1", password="nope")
    with pytest.raises(Exception, match="refused|did not answer|cannot reach"):
        SyncClient(bad, timeout=5).connect()
