"""The one-row matmul kernel switch: right setting inside, the user's setting after, concurrent
forwards never see the other kind's setting, and arrivals are served in order."""

from __future__ import annotations

import threading
import time

import torch
import torch.nn.functional as F

from atomr_trio.model.cpu_gemv import KernelChoice

CPU = torch.device("cpu")


def test_one_row_switches_onednn_off_and_restores_the_users_setting() -> None:
    choice = KernelChoice()
    assert torch._C._get_mkldnn_enabled()
    with choice.rows(CPU, 1):
        assert not torch._C._get_mkldnn_enabled()
    with choice.rows(CPU, 16):
        assert torch._C._get_mkldnn_enabled()
    assert torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)  # a user who turned oneDNN off keeps it off
    try:
        with choice.rows(CPU, 16):
            assert not torch._C._get_mkldnn_enabled()
        assert not torch._C._get_mkldnn_enabled()
    finally:
        torch._C._set_mkldnn_enabled(True)


def test_other_devices_are_left_alone() -> None:
    with KernelChoice().rows(torch.device("meta"), 1):
        assert torch._C._get_mkldnn_enabled()


def test_both_kernels_give_the_same_numbers() -> None:
    choice = KernelChoice()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(384, 256, generator=g).to(torch.bfloat16)
    x = torch.randn(1, 256, generator=g).to(torch.bfloat16)
    with choice.rows(CPU, 1):
        one = F.linear(x, w)
    with choice.rows(CPU, 2):
        other = F.linear(x, w)
    assert torch.equal(one, other)


def test_concurrent_forwards_take_turns_in_arrival_order() -> None:
    choice = KernelChoice()
    log: list[tuple[str, bool]] = []
    a_inside, release_a = threading.Event(), threading.Event()

    def run(name: str, rows: int, hold: threading.Event | None = None) -> None:
        with choice.rows(CPU, rows):
            log.append((name + " in", torch._C._get_mkldnn_enabled()))
            if hold is not None:
                a_inside.set()
                hold.wait(5)
            else:
                time.sleep(0.05)
            log.append((name + " out", torch._C._get_mkldnn_enabled()))

    a = threading.Thread(target=run, args=("a", 16, release_a))
    a.start()
    assert a_inside.wait(5)
    b = threading.Thread(target=run, args=("b", 1))  # wants the other setting: waits for a
    b.start()
    time.sleep(0.1)
    c = threading.Thread(target=run, args=("c", 8))  # same setting as a, but arrived after b
    c.start()
    time.sleep(0.1)
    assert [n for n, _ in log] == ["a in"]
    release_a.set()
    for t in (a, b, c):
        t.join(5)
    assert log == [("a in", True), ("a out", True), ("b in", False), ("b out", False),
                   ("c in", True), ("c out", True)]
    assert torch._C._get_mkldnn_enabled()
