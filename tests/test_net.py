import pytest

from services.common.net import host_port, is_loopback


@pytest.mark.parametrize("host, loopback", [
    ("localhost", True), ("LOCALHOST", True), ("127.0.0.1", True), ("127.9.8.7", True), ("::1", True),
    ("[::1]", True), ("0:0:0:0:0:0:0:1", True), ("0.0.0.0", False), ("::", False), ("10.0.0.1", False),
    ("example.com", False), ("127.example.com", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_host_port_brackets_ipv6_once():
    assert host_port("127.0.0.1", 5) == "127.0.0.1:5"
    assert host_port("::1", 5) == "[::1]:5" and host_port("[::1]", 5) == "[::1]:5"
