"""free_loopback_port never hands out one port twice in a row of launches (RECENT_S)."""

from __future__ import annotations

import socket

import pytest

from instance_agent import launch


def test_two_hundred_ports_in_a_row_are_all_different() -> None:
    ports = [launch.free_loopback_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    for port in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # each was free when handed out, and still is


def test_a_port_handed_out_is_held_back_only_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(launch.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(launch, "_handed_out", {})
    first = launch.free_loopback_port()
    assert first in launch._handed_out
    now[0] += launch.RECENT_S + 1
    launch.free_loopback_port()
    assert first not in launch._handed_out  # forgotten once the window passed
