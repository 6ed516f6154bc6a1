"""Test-wide guards: no network, offline hubs, deterministic and quiet.

Every non-loopback connection fails the test that tried it, so a test that would download a model
fails loudly instead of silently passing on a developer's online laptop.
"""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["YOLO_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


class NetworkBlocked(RuntimeError):
    pass


def _is_loopback(address) -> bool:
    if isinstance(address, (tuple, list)) and address:
        host = address[0]
    else:
        return True  # AF_UNIX paths and the like are local
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost means a lookup: refuse


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo
_attempts: list[str] = []


def _guard_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        _attempts.append(repr(address))
        raise NetworkBlocked(f"test tried to open a network connection to {address!r}")
    return _real_connect(self, address)


def _guard_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        _attempts.append(repr(address))
        raise NetworkBlocked(f"test tried to open a network connection to {address!r}")
    return _real_connect_ex(self, address)


def _guard_getaddrinfo(host, *args, **kwargs):
    if host not in (None, "localhost", "127.0.0.1", "::1", "0.0.0.0"):
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError
        except ValueError:
            _attempts.append(f"lookup {host!r}")
            raise NetworkBlocked(f"test tried to resolve the host name {host!r}") from None
    return _real_getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guard_connect
socket.socket.connect_ex = _guard_connect_ex
socket.getaddrinfo = _guard_getaddrinfo


@pytest.fixture(autouse=True)
def _fail_on_network_attempt():
    """Libraries sometimes swallow connection errors; fail the test anyway."""
    start = len(_attempts)
    yield
    tried = _attempts[start:]
    if tried:
        pytest.fail(f"test attempted network access: {', '.join(tried[:3])}")


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    """The tiny random model zoo, built once per test session through the user-facing builder."""
    from harness.models.tiny import build_zoo

    out = tmp_path_factory.mktemp("zoo")
    build_zoo(out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_sd_dir(zoo_dir):
    return zoo_dir / "sd"


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: the CI cores are shared, and many tiny ops gain nothing from more."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
