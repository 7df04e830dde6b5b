"""`HostKeys`, the one host key policy of the package's SSH connections, on keys that OpenSSH's
`ssh-keygen` makes: which lines cover which address, as OpenSSH reads known_hosts, and trust on
first use. The connections themselves are tested with real servers in test_cluster_tunnels.py,
test_token_auth.py and test_autoscaler_failures.py."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from prefect_raydog import HostKeyRefused, HostKeys
from prefect_raydog.host_keys import fingerprint


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    """Two host public key lines, `a` and `b`, by name."""
    directory = tmp_path_factory.mktemp("host-keys")
    lines = {}
    for name, kind in (("a", "ed25519"), ("b", "ecdsa")):
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(directory / name)],
                       check=True)
        lines[name] = (directory / f"{name}.pub").read_text()
    return lines


def _key(public_line: str) -> bytes:
    return base64.b64decode(public_line.split()[1])


def test_a_public_key_line_covers_every_address_and_refuses_another_key(keys):
    pinned = HostKeys(keys["a"])
    pinned.check("10.0.0.7", _key(keys["a"]))
    pinned.check("[203.0.113.9]:2222", _key(keys["a"]))
    with pytest.raises(HostKeyRefused) as refused:
        pinned.check("10.0.0.7", _key(keys["b"]))
    assert str(refused.value).startswith(
        f"The SSH host key of 10.0.0.7 is {fingerprint(_key(keys['b']))}, not a key that "
        f"ssh_known_hosts gives for it ({fingerprint(_key(keys['a']))})")


def test_the_fingerprint_is_openssh_s_own(keys, tmp_path):
    (tmp_path / "a.pub").write_text(keys["a"])
    shown = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "a.pub")], check=True,
                           capture_output=True, text=True).stdout.split()[1]
    assert fingerprint(_key(keys["a"])) == f"ssh-ed25519 {shown}"


def test_host_patterns_negations_and_ports_select_the_lines_as_openssh_does(keys):
    policy = HostKeys(f"10.0.0.*,!10.0.0.9 {keys['a']}\n[10.0.0.9]:2222 {keys['b']}")
    policy.check("10.0.0.3", _key(keys["a"]))
    policy.check("[10.0.0.9]:2222", _key(keys["b"]))
    for name in ("10.0.0.9", "10.0.1.3", "[10.0.0.3]:2222"):
        with pytest.raises(HostKeyRefused) as refused:
            policy.check(name, _key(keys["b"]))
        assert str(refused.value).startswith(
            f"The SSH host key of {name} ({fingerprint(_key(keys['b']))}) is not known: no line "
            "of ssh_known_hosts covers that address")


def test_hashed_names_written_by_ssh_keygen_match(keys, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"10.0.0.5 {keys['a']}")
    subprocess.run(["ssh-keygen", "-H", "-f", str(known_hosts)], check=True, capture_output=True)
    policy = HostKeys(known_hosts.read_text())
    policy.check("10.0.0.5", _key(keys["a"]))
    with pytest.raises(HostKeyRefused, match="is not known"):
        policy.check("10.0.0.6", _key(keys["a"]))


def test_trust_on_first_use_keeps_each_address_s_first_key(keys):
    policy = HostKeys(trust_first_use=True)
    policy.check("10.0.0.1", _key(keys["a"]))
    policy.check("10.0.0.1", _key(keys["a"]))
    policy.check("10.0.0.2", _key(keys["b"]))
    with pytest.raises(HostKeyRefused, match=(
            r"^The SSH host key of 10.0.0.1 changed: it is ecdsa-sha2-nistp256 SHA256:\S+, and "
            r"was ssh-ed25519 SHA256:\S+ when first seen for this cluster")):
        policy.check("10.0.0.1", _key(keys["b"]))


def test_trust_on_first_use_still_holds_a_covered_address_to_its_pinned_keys(keys):
    policy = HostKeys(f"10.0.0.1 {keys['a']}", trust_first_use=True)
    with pytest.raises(HostKeyRefused, match="not a key that ssh_known_hosts gives"):
        policy.check("10.0.0.1", _key(keys["b"]))


@pytest.mark.parametrize(("line", "reason"), [
    ("@cert-authority * {a}", "markers such as @cert-authority are not supported"),
    ("10.0.0.1 ssh-ed25519 not-base64", "the key is not valid base64 of an SSH public key"),
    ("10.0.0.1 ssh-rsa {a_key}", "the key is a 'ssh-ed25519' key, not 'ssh-rsa'"),
    ("10.0.0.1", "expected `[HOSTS] KEY-TYPE BASE64-KEY [COMMENT]`"),
])
def test_a_bad_line_is_refused_naming_its_number(keys, line, reason):
    text = "# a comment\n\n" + line.format(a=keys["a"], a_key=keys["a"].split()[1])
    with pytest.raises(ValueError) as error:
        HostKeys(text, source="provider.ssh_known_hosts")
    assert str(error.value).startswith(f"provider.ssh_known_hosts: line 3: {reason}")


def test_openssh_options_carry_the_lines_and_keep_what_openssh_learned(keys, tmp_path: Path):
    known_hosts = tmp_path / "known_hosts"
    options = HostKeys(keys["a"]).openssh_options(known_hosts)
    assert options["StrictHostKeyChecking"] == "yes"
    assert known_hosts.read_text().startswith(f"* {' '.join(keys['a'].split()[:2])}")
    learned = tmp_path / "learned"
    learned.write_text(f"10.0.0.3 {keys['b']}")
    options = HostKeys(trust_first_use=True).openssh_options(learned)
    assert options["StrictHostKeyChecking"] == "accept-new"
    assert learned.read_text() == f"10.0.0.3 {keys['b']}"
