"""The lab's progress lines (``vblk demo``): plain lines in a log, one live line on a terminal."""
import io
import re
import time

from vblk.lab.progress import Steps


def test_in_a_log_a_quick_step_prints_only_its_result():
    out = io.StringIO()
    with Steps(out, live=False).step("guest", "building") as step:
        step.done("Linux 6.1 (cached)")
    assert out.getvalue() == "  guest      Linux 6.1 (cached)\n"


def test_in_a_log_a_long_step_says_what_it_does_and_when():
    out = io.StringIO()
    with Steps(out, live=False).step("boot", "starting QEMU") as step:
        time.sleep(1.2)                                  # announced after a second
        step.note("/dev/vda is there")
        step.done("ran in 1.3 s")
    lines = out.getvalue().splitlines()
    assert lines[0] == "  boot       starting QEMU ..."
    assert lines[1].startswith("             /dev/vda is there (1.") and lines[1].endswith(" s)")
    assert lines[2] == "  boot       ran in 1.3 s" and len(lines) == 3


def test_a_note_before_the_first_second_announces_the_step_first():
    out = io.StringIO()
    with Steps(out, live=False).step("boot", "starting QEMU") as step:
        step.note("kernel booting")
    assert out.getvalue().splitlines()[:2] == ["  boot       starting QEMU ...",
                                               "             kernel booting (0.0 s)"]


def test_on_a_terminal_the_step_is_one_line_rewritten_then_replaced():
    out = io.StringIO()
    with Steps(out, live=True).step("boot", "starting QEMU") as step:
        time.sleep(0.6)                                  # one tick
        step.note("mkfs.ext4 /dev/vda")
        step.done("ran in 0.6 s")
    text = out.getvalue()
    assert re.search(r"\r\x1b\[K  boot       starting QEMU \(\d s\)", text)
    assert "\r\x1b[K  boot       mkfs.ext4 /dev/vda (" in text
    assert text.endswith("\r\x1b[K  boot       ran in 0.6 s\n")
    assert text.count("\n") == 1                          # nothing left behind but the result
