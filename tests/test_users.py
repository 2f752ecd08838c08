"""The users file (pigeon.server.users) and the login throttle's rule, without a server."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from pigeon.server.throttle import LoginThrottle, address_key
from pigeon.server.users import (
    HASH_BYTES,
    SCRYPT_N,
    Users,
    UsersError,
    check_pattern,
    hash_password,
    load_users,
    parse_hash,
    parse_users,
)

# cheap parameters keep the suite fast; the format and the check are the same
FAST = {"n": 16, "r": 1, "p": 1}


def fast_hash(password: str) -> str:
    """A valid scrypt line for ``password`` that takes microseconds."""
    return hash_password(password, **FAST)


def test_a_hash_line_has_the_documented_form_and_checks_its_password() -> None:
    line = hash_password("s3cret")
    scheme, n, r, p, salt, digest = line.split("$")
    assert (scheme, n, r, p) == ("scrypt", str(SCRYPT_N), "8", "1")
    assert len(base64.b64decode(salt)) == 16 and len(base64.b64decode(digest)) == HASH_BYTES
    parsed = parse_hash(line)
    assert str(parsed) == line
    assert parsed.matches(b"s3cret")
    assert not parsed.matches(b"s3cret ") and not parsed.matches(b"")


def test_two_hashes_of_one_password_differ_by_their_salt() -> None:
    assert fast_hash("same") != fast_hash("same")


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("plain-password", "not a scrypt$n$r$p$salt$hash line"),
        ("bcrypt$16$8$1$AAAA$AAAA", "not a scrypt"),
        ("scrypt$x$8$1$AAAA$AAAA", "whole numbers"),
        ("scrypt$1000$8$1$AAAA$AAAA", "power of 2"),
        (f"scrypt${1 << 21}$8$1$AAAA$AAAA", "power of 2"),
        ("scrypt$16$0$1$AAAA$AAAA", "r must be"),
        ("scrypt$1048576$64$16$AAAA$AAAA", "MiB per check"),
        ("scrypt$16$1$1$not base64!$AAAA", "base64"),
        ("scrypt$16$1$1$$" + base64.b64encode(b"x" * 32).decode(), "salt must not be empty"),
        ("scrypt$16$1$1$AAAA$AAAA", "at least 16 bytes"),
    ],
)
def test_a_malformed_hash_is_refused_with_its_reason(line: str, says: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_hash(line)
    assert says in str(info.value)


@pytest.mark.parametrize(
    "pattern", ["orders", "orders.*", "orders.>", "*", ">", "*.created", "a.*.c.>", "ord*"]
)
def test_valid_patterns(pattern: str) -> None:
    check_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("", "empty"),
        ("orders..x", "empty token"),
        (".orders", "empty token"),
        ("orders.", "empty token"),
        ("orders.>.x", "'>' may only be the last token"),
        (">.x", "'>' may only be the last token"),
        ("has space", "whitespace"),
        ("zero\u200bwidth", "whitespace"),
        ("x" * 256, "at most 255 bytes"),
    ],
)
def test_invalid_patterns_are_refused_with_the_reason(pattern: str, says: str) -> None:
    with pytest.raises(ValueError) as info:
        check_pattern(pattern)
    assert says in str(info.value)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "users.toml"
    path.write_text(text)
    return path


def test_the_documented_example_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
[users.orders-api]
password = "{fast_hash("a")}"
publish = ["orders.*"]
subscribe = []
[users.worker]
password = "{fast_hash("b")}"
subscribe = ["orders.>", "jobs"]
publish = ["results.>"]
[users.ops]
password = "{fast_hash("c")}"
admin = true
""",
    )
    users = load_users(path)
    assert sorted(users.by_name) == ["ops", "orders-api", "worker"]
    worker = users.get("worker")
    assert worker is not None
    assert (worker.publish, worker.subscribe, worker.admin) == (("results.>",), ("orders.>", "jobs"), False)
    ops = users.get("ops")
    assert ops is not None and ops.admin and ops.publish == () and ops.subscribe == ()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ('[users.bob]\npublish = ["a"]\n', "user 'bob': password: missing"),
        ('[users.bob]\npassword = "hunter2"\n', "user 'bob': password: not a scrypt"),
        ("[users.bob]\npassword = 5\n", "user 'bob': password: must be a string"),
        ('[users.bob]\npassword = "{h}"\npublish = "a"\n', "user 'bob': publish: must be a list of strings"),
        ('[users.bob]\npassword = "{h}"\nsubscribe = ["a..b"]\n', "user 'bob': subscribe: pattern 'a..b'"),
        ('[users.bob]\npassword = "{h}"\nadmin = "yes"\n', "user 'bob': admin: must be true or false"),
        ('[users.bob]\npassword = "{h}"\ncluster = 1\n', "user 'bob': cluster: must be true or false"),
        ('[users.bob]\npassword = "{h}"\nsubcribe = ["a"]\n', "user 'bob': unknown field(s) ['subcribe']"),
        ('[users."two words"]\npassword = "{h}"\n', "user 'two words': user name"),
        ('[users.bob]\npassword = "{h}"\n[extra]\nx = 1\n', "unknown top-level key(s) ['extra']"),
        ("users = 3\n", "'users' must be a table"),
        ("[users]\nbob = 3\n", "user 'bob': must be a table"),
        ("[users.bob\n", "not valid TOML"),
    ],
)
def test_a_malformed_file_is_refused_naming_the_file_user_and_field(
    tmp_path: Path, body: str, says: str
) -> None:
    path = write(tmp_path, body.replace("{h}", fast_hash("x")))
    with pytest.raises(UsersError) as info:
        load_users(path)
    assert str(info.value).startswith(str(path) + ": ")
    assert says in str(info.value)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsersError, match="cannot read"):
        load_users(tmp_path / "nope.toml")


def test_check_gives_the_user_only_for_the_right_password() -> None:
    users = parse_users({"users": {"bob": {"password": fast_hash("right")}}})
    found = users.check(b"bob", b"right")
    assert found is not None and found.name == "bob"
    assert users.check(b"bob", b"wrong") is None
    assert users.check(b"alice", b"right") is None
    assert users.check(b"\xff\xfe", b"right") is None


def test_an_unknown_user_spends_a_hash_with_the_users_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    users = parse_users({"users": {"bob": {"password": fast_hash("right")}}})
    spent: list[tuple[int, int, int]] = []
    import hashlib

    real = hashlib.scrypt

    def counting(password: bytes, *, salt: bytes, n: int, r: int, p: int, dklen: int, maxmem: int) -> bytes:
        spent.append((n, r, p))
        return real(password, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=maxmem)

    monkeypatch.setattr(hashlib, "scrypt", counting)
    assert users.check(b"nobody", b"x") is None
    assert spent == [(16, 1, 1)]


def test_an_empty_file_has_no_users(tmp_path: Path) -> None:
    users = load_users(write(tmp_path, ""))
    assert len(users) == 0 and users.check(b"x", b"y") is None
    assert isinstance(users, Users)


def test_the_throttle_delays_after_five_failures_doubling_up_to_the_cap() -> None:
    throttle = LoginThrottle()
    now = 1000.0
    for _ in range(5):
        assert throttle.delay("10.0.0.1", now) == 0
        throttle.failed("10.0.0.1", now)
    delays = []
    for _ in range(6):
        delay = throttle.delay("10.0.0.1", now)
        delays.append(delay)
        now += delay  # answered after its delay, and failed
        throttle.failed("10.0.0.1", now)
    assert delays == [1, 2, 4, 8, 16, 30]
    assert throttle.throttled == 6
    # another address is not concerned
    assert throttle.delay("10.0.0.2", now) == 0


def test_throttled_answers_to_one_address_are_spaced_even_when_asked_at_once() -> None:
    throttle = LoginThrottle()
    for _ in range(5):
        throttle.failed("10.0.0.1", 0.0)
    assert [throttle.delay("10.0.0.1", 1.0) for _ in range(3)] == [1, 2, 3]


def test_failures_older_than_the_window_are_forgotten() -> None:
    throttle = LoginThrottle()
    for _ in range(5):
        throttle.failed("10.0.0.1", 0.0)
    assert throttle.delay("10.0.0.1", 59.0) == 1
    assert throttle.delay("10.0.0.1", 61.0) == 0


def test_the_throttle_forgets_quiet_addresses() -> None:
    throttle = LoginThrottle()
    for when in (0.0, 100.0):
        for i in range(3000):
            throttle.failed(f"10.{int(when)}.{i // 256}.{i % 256}", when)
    # the sweeps keep only the addresses that failed within the last minute
    assert len(throttle) == 3000


def test_ipv6_addresses_count_by_their_64_network() -> None:
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert address_key("10.0.0.1") == "10.0.0.1"


def test_a_node_user_is_one_with_cluster_true_and_an_admin_may_replicate_too() -> None:
    users = parse_users(
        {
            "users": {
                "node": {"password": fast_hash("x"), "cluster": True},
                "ops": {"password": fast_hash("x"), "admin": True},
                "bob": {"password": fast_hash("x"), "publish": [">"]},
            }
        }
    )
    assert [name for name in ("node", "ops", "bob") if users.get(name).may_replicate] == ["node", "ops"]  # type: ignore[union-attr]
    node = users.get("node")
    assert node is not None and not node.admin and node.publish == () and node.subscribe == ()
