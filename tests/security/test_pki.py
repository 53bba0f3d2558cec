"""The fleet CA, identities in certificates, the CLI, the configs and the rule table."""

from __future__ import annotations

import datetime as dt
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from edgeward.cli import main
from edgeward.security.authz import RULES, rule_for
from edgeward.security.errors import IdentityError, PkiError
from edgeward.security.identity import Identity, Role
from edgeward.security.mqtt_acl import TopicAcl, mosquitto_acl
from edgeward.security.pki import FleetCA, parse_subject
from edgeward.security.tls import RevocationList
from node_agent.config import AgentConfig
from orchestrator.config import OrchestratorConfig


def test_issued_certificates_carry_the_identity_and_keys_are_private(fleet_ca: FleetCA):
    for role, name, team in [
        ("node", "node-7", None),
        ("team", "ci", "smart-home"),
        ("operator", "alice", None),
    ]:
        identity = parse_subject(role, name, team)
        files = fleet_ca.issue(identity)
        cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
        assert Identity.from_certificate(cert) == Identity(
            identity.role, name, team, serial=cert.serial_number
        )
        assert stat.S_IMODE(files.key_file.stat().st_mode) == 0o600
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(fleet_ca.ca_file.read_bytes()))
    assert stat.S_IMODE((fleet_ca.dir / "ca.key").stat().st_mode) == 0o600
    assert [r.subject for r in fleet_ca.list()] == [
        "orchestrator:main",
        "node-7",
        "team:smart-home:ci",
        "operator:alice",
    ]


@pytest.mark.parametrize(
    ("role", "name", "team", "reason"),
    [
        ("node", "Node_1", None, "security.identity.bad_name"),  # not a node id
        ("node", "a:b", None, "security.identity.bad_name"),  # could pose as another role's CN
        ("team", "ci", None, "security.identity.bad_team"),
        ("operator", "alice", "smart-home", "security.identity.bad_team"),
        ("root", "alice", None, "security.pki.bad_role"),
    ],
)
def test_malformed_subjects_are_refused_with_a_reason(role, name, team, reason):
    with pytest.raises(PkiError) as info:
        parse_subject(role, name, team)
    assert info.value.reason == reason


def test_revocation_reaches_the_crl_and_reissue_rotates(fleet_ca: FleetCA):
    first = fleet_ca.issue(parse_subject("node", "node-1"))
    with pytest.raises(PkiError, match=r"security\.pki\.exists"):
        fleet_ca.issue(parse_subject("node", "node-1"))
    crl = RevocationList(fleet_ca.crl_file, fleet_ca.ca_file, min_interval_s=0)
    assert not crl.is_revoked(first.serial)
    second = fleet_ca.issue(parse_subject("node", "node-1"), replace=True)
    assert second.serial != first.serial
    revoked = fleet_ca.revoke("node-1")  # every live certificate of the subject
    assert {int(r.serial, 16) for r in revoked} == {first.serial, second.serial}
    assert crl.is_revoked(first.serial) and crl.is_revoked(second.serial)
    with pytest.raises(PkiError, match=r"security\.pki\.unknown"):
        fleet_ca.revoke("node-1")


def test_a_crl_not_signed_by_the_fleet_ca_is_ignored(fleet_ca: FleetCA, tmp_path):
    node = fleet_ca.issue(parse_subject("node", "node-1"))
    crl = RevocationList(fleet_ca.crl_file, fleet_ca.ca_file, min_interval_s=0)
    forger = FleetCA.init(tmp_path / "forger")
    forged = forger.issue(parse_subject("node", "node-1"))
    forger.revoke("node-1")
    fleet_ca.crl_file.write_bytes(forger.crl_file.read_bytes())
    assert crl.revoked == frozenset()
    assert not crl.is_revoked(forged.serial) and not crl.is_revoked(node.serial)


def test_a_certificate_without_an_edgeward_identity_is_refused(tmp_path):
    with pytest.raises(IdentityError) as info:
        Identity.from_pem(b"not a certificate")
    assert info.value.reason == "security.identity.bad_certificate"


def test_the_cli_manages_the_ca_and_never_prints_a_key(tmp_path, capsys):
    pki = str(tmp_path / "pki")
    assert main(["pki", "--dir", pki, "init"]) == 0
    assert main(["pki", "--dir", pki, "issue", "orchestrator", "main"]) == 0
    assert main(["pki", "--dir", pki, "issue", "team", "ci", "--team", "automotive"]) == 0
    assert main(["pki", "--dir", pki, "issue", "team", "ci"]) == 2  # no --team
    assert main(["pki", "--dir", pki, "revoke", "team:automotive:ci"]) == 0
    out_dir = tmp_path / "mosq"
    assert main(["pki", "--dir", pki, "mosquitto-conf", "--out", str(out_dir), "--port", "18883"]) == 0
    assert main(["pki", "--dir", pki, "list"]) == 0
    out = capsys.readouterr()
    assert "PRIVATE KEY" not in out.out + out.err
    assert "--team is required" in out.err
    listing = out.out.splitlines()[-3:]
    assert [line.split()[0] for line in listing] == [
        "orchestrator:main",
        "team:automotive:ci",
        "broker:mosquitto",
    ]
    assert "revoked" in listing[1] and "valid" in listing[0]
    conf = (out_dir / "mosquitto.conf").read_text()
    for line in ("require_certificate true", "use_identity_as_username true", "allow_anonymous false"):
        assert line in conf
    assert "listener 18883 127.0.0.1" in conf


def test_acl_rules_and_the_mosquitto_acl_agree():
    acl = TopicAcl("p/v1")
    node, orch, op = (
        Identity(Role.NODE, "n1"),
        Identity(Role.ORCHESTRATOR, "main"),
        Identity(Role.OPERATOR, "a"),
    )
    assert acl.may_publish(node, "p/v1/nodes/n1/telemetry")
    assert not acl.may_publish(node, "p/v1/nodes/n1/cmd")
    assert not acl.may_publish(node, "p/v1/nodes/n2/telemetry")
    assert acl.may_subscribe(node, "p/v1/nodes/n1/cmd")
    for foreign in ("p/v1/nodes/+/cmd", "p/v1/#", "p/v1/nodes/n1/+", "#"):
        assert not acl.may_subscribe(node, foreign), foreign
    assert acl.may_subscribe(orch, "p/v1/nodes/+/hello") and acl.may_publish(orch, "p/v1/nodes/n9/cmd")
    assert acl.may_subscribe(op, "p/v1/events/#") and not acl.may_subscribe(op, "p/v1/nodes/+/hello")
    assert not acl.may_publish(None, "p/v1/nodes/n1/hello")
    text = mosquitto_acl("p/v1", ["orchestrator:main"], ["operator:a"], ["n1"])
    assert "pattern" not in text  # a pattern would apply to every certificate, teams included
    assert "user n1\ntopic write p/v1/nodes/n1/hello" in text
    assert "topic read p/v1/nodes/n1/cmd" in text and "topic write p/v1/nodes/n1/cmd" not in text
    assert "user orchestrator:main\ntopic readwrite p/v1/#" in text


def test_unlisted_methods_are_for_operators_and_writes_are_audited():
    assert rule_for("/edgeward.v1.ModelService/Wipe").roles == {Role.OPERATOR}
    assert rule_for("/edgeward.v1.ModelService/Wipe").is_mutating(None)
    assert not rule_for("/edgeward.v1.ModelService/ListWipes").is_mutating(None)
    assert all(Role.OPERATOR in rule.roles for rule in RULES.values())


def test_configs_default_to_tls_when_the_pki_is_given(fleet_ca: FleetCA, tmp_path):
    cfg = OrchestratorConfig.model_validate(
        {"security": {"pki_dir": fleet_ca.dir}, "broker": {"url": "mqtts://broker:8883"}}
    )
    assert cfg.security is not None
    assert cfg.broker.cert_file == fleet_ca.dir / "orchestrator" / "main.crt"
    assert cfg.security.crl_file == fleet_ca.crl_file
    with pytest.raises(ValueError, match="plaintext mqtt:// is refused"):
        OrchestratorConfig.model_validate(
            {"security": {"pki_dir": fleet_ca.dir}, "broker": {"url": "mqtt://broker:1883"}}
        )
    with pytest.raises(ValueError, match=r"grpc_bind: '0\.0\.0\.0:50051' is not a loopback"):
        OrchestratorConfig.model_validate({"grpc_bind": "0.0.0.0:50051"})
    tls = {"ca_file": "ca.crt", "cert_file": "n.crt", "key_file": "n.key"}
    agent = AgentConfig.model_validate({"node_id": "n1", "tls": tls})
    assert (agent.broker.url, str(agent.broker.key_file)) == ("mqtts://127.0.0.1:8883", "n.key")
    with pytest.raises(ValueError, match="plaintext mqtt:// is refused"):
        AgentConfig.model_validate({"node_id": "n1", "tls": tls, "broker": {"url": "mqtt://b:1883"}})


def test_an_older_crl_does_not_undo_a_revocation(fleet_ca: FleetCA):
    """Any CRL the fleet CA signed was taken, the oldest too: a copy from before a revocation, put back
    where a server reads its CRL (a replayed file, a stale copy from configuration management),
    made the revoked certificate good again."""
    node, other = (fleet_ca.issue(parse_subject("node", n)) for n in ("node-1", "node-2"))
    ca_key, ca_cert = fleet_ca._load_ca()
    now = dt.datetime.now(dt.UTC)
    older = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(days=1))
        .next_update(now + dt.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    crl = RevocationList(fleet_ca.crl_file, fleet_ca.ca_file, min_interval_s=0)
    fleet_ca.revoke("node-1")
    assert crl.is_revoked(node.serial)
    fleet_ca.crl_file.write_bytes(older)
    assert crl.is_revoked(node.serial)
    fleet_ca.revoke("node-2")  # the next CRL is taken as usual
    assert crl.is_revoked(node.serial) and crl.is_revoked(other.serial)
