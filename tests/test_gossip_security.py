"""Mesh-key sealing, keyring rotation, replay guard, and the [gossip] config validation."""

from __future__ import annotations

import base64

import msgspec
import pytest

from gossip.messages import Ping, encode
from gossip.profile import SwimConfig
from transport.gossip_config import GossipConfig, parse_hostport
from transport.gossip_crypto import (
    CHANNEL_TCP,
    CHANNEL_UDP,
    OVERHEAD,
    CryptoError,
    Keyring,
    ReplayGuard,
    Sealer,
    parse_keys,
)

K1 = bytes(range(32))
K2 = bytes(range(1, 33))


def b64(k: bytes) -> str:
    return base64.b64encode(k).decode()


def test_seal_open_round_trip_with_exact_overhead() -> None:
    s = Sealer(Keyring([K1]), boot_id=b"\x01\x02\x03\x04")
    plain = encode(Ping(9, "n1"))
    sealed = s.seal(plain, CHANNEL_UDP, 1_700_000_000_000)
    assert len(sealed) == len(plain) + OVERHEAD == len(plain) + 29
    out, ms, nonce = Sealer(Keyring([K1])).open(sealed, CHANNEL_UDP)
    assert out == plain and ms == 1_700_000_000_000 and nonce is not None


def test_wrong_key_tampering_and_channel_confusion_are_rejected() -> None:
    sealed = Sealer(Keyring([K1])).seal(b"hello", CHANNEL_UDP, 1000)
    with pytest.raises(CryptoError) as e:
        Sealer(Keyring([K2])).open(sealed, CHANNEL_UDP)
    assert e.value.reason == "bad_key"
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(CryptoError):
        Sealer(Keyring([K1])).open(flipped, CHANNEL_UDP)
    with pytest.raises(CryptoError):  # a datagram replayed into a stream
        Sealer(Keyring([K1])).open(sealed, CHANNEL_TCP)
    with pytest.raises(CryptoError) as e:
        Sealer(Keyring([K1])).open(b"\x00plain", CHANNEL_UDP)
    assert e.value.reason == "plain"
    with pytest.raises(CryptoError) as e:
        Sealer(None).open(sealed, CHANNEL_UDP)  # unkeyed nodes drop keyed traffic too
    assert e.value.reason == "bad_key"
    with pytest.raises(CryptoError, match="too short"):
        Sealer(Keyring([K1])).open(b"\x01abc", CHANNEL_UDP)


def test_keyring_rotation_first_encrypts_all_decrypt() -> None:
    old = Sealer(Keyring([K1]))
    mid = Sealer(Keyring([K1, K2]))  # step 1: new key added second
    new = Sealer(Keyring([K2, K1]))  # step 2: new key first
    for a in (old, mid, new):
        for b in (mid, new):
            msg = a.seal(b"x", CHANNEL_UDP, 5)
            assert b.open(msg, CHANNEL_UDP)[0] == b"x"
    with pytest.raises(CryptoError):
        old.open(new.seal(b"x", CHANNEL_UDP, 5), CHANNEL_UDP)


def test_nonces_are_unique_even_within_one_millisecond() -> None:
    s = Sealer(Keyring([K1]))
    nonces = {s.seal(b"", CHANNEL_UDP, 42)[1:13] for _ in range(70_000)}
    assert len(nonces) == 70_000


def test_replay_guard_drops_repeats_and_stale_messages() -> None:
    g = ReplayGuard(window_s=30)
    g.check(b"n1", 100_000, 100_500)
    with pytest.raises(CryptoError) as e:
        g.check(b"n1", 100_000, 101_000)
    assert e.value.reason == "replay"
    with pytest.raises(CryptoError) as e:
        g.check(b"n2", 100_000, 131_000)  # sealed 31 s ago
    assert e.value.reason == "stale"
    g.check(b"n3", 200_000, 200_000)  # old entries expire without harm
    assert len(g._seen) == 1


def test_parse_keys_names_the_bad_key() -> None:
    assert parse_keys([b64(K1)]) == [K1]
    with pytest.raises(ValueError, match=r"gossip.keys\[1\]: not valid base64"):
        parse_keys([b64(K1), "%%%"])
    with pytest.raises(ValueError, match=r"gossip.keys\[0\]: an AES key must be 16, 24 or 32"):
        parse_keys([b64(b"short")])


def test_config_defaults_and_profile_overrides() -> None:
    cfg = GossipConfig()
    assert not cfg.enabled and cfg.port == 7946 and cfg.profile == "default"
    sc = GossipConfig(profile="memberlist", probe_interval=2.0, keys=[b64(K1)]).swim_config()
    assert sc.probe_interval == 2.0 and sc.probe_timeout == 0.5 and sc.wire_overhead == 29
    assert GossipConfig(insecure_no_key=True).swim_config().wire_overhead == 1
    # reconnect and join retry reach the core; the [gossip] defaults are the core's
    default = GossipConfig().swim_config()
    core_default = SwimConfig()
    for name in ("reconnect_interval_s", "reconnect_timeout_s", "join_retry_s"):
        assert getattr(default, name) == getattr(core_default, name)
    sc = GossipConfig(reconnect_interval_s=0, reconnect_timeout_s=60, join_retry_s=0.5).swim_config()
    assert (sc.reconnect_interval_s, sc.reconnect_timeout_s, sc.join_retry_s) == (0, 60, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"port": 70000}, "gossip.port"),
        ({"seeds": ["nohost"]}, r"gossip.seeds\[0\]"),
        ({"seeds": ["h:0"]}, r"gossip.seeds\[0\]"),
        ({"enabled": True}, "gossip.keys: gossip is enabled but no mesh key"),
        ({"profile": "fast"}, "gossip.profile"),
        ({"bind": "0.0.0.0"}, "gossip.advertise"),
        ({"probe_interval": 0.1, "probe_timeout": 0.5}, "gossip.probe_timeout"),
        ({"replay_window_s": 0}, "gossip.replay_window_s"),
        ({"reconnect_interval_s": -1}, "gossip.reconnect_interval_s"),
        ({"reconnect_timeout_s": -5}, "gossip.reconnect_timeout_s"),
        ({"join_retry_s": 0}, "gossip.join_retry_s"),
        ({"mdns_service": "memkv"}, "gossip.mdns_service"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GossipConfig(**kwargs)  # type: ignore[arg-type]


def test_config_decodes_from_toml_and_forbids_unknown_fields() -> None:
    import tomllib

    text = f'enabled = true\nport = 0\nseeds = ["10.0.0.1:7946"]\nkeys = ["{b64(K1)}"]\n'
    cfg = msgspec.convert(tomllib.loads(text), GossipConfig)
    assert cfg.enabled and cfg.seed_addrs() == [("10.0.0.1", 7946)]
    with pytest.raises(msgspec.ValidationError, match="unknown field `prot`"):
        msgspec.convert({"prot": 1}, GossipConfig)
    with pytest.raises(msgspec.ValidationError, match="gossip.port"):
        msgspec.convert({"port": -1}, GossipConfig)


def test_parse_hostport_handles_ipv6() -> None:
    assert parse_hostport("[::1]:7946", "x") == ("::1", 7946)
    assert parse_hostport("node-1.lan:80", "x") == ("node-1.lan", 80)
