"""The queue-depth sweep of a comparison, drawn: IOPS and p50 latency against queue depth.

The only module that imports matplotlib (``pip install 'vblk[bench]'``), and only inside
``plot_sweep``; ``check_plot_support`` says early whether it is there.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from vblk.lab.servers import BACKENDS
from vblk.lab.workload import BenchError

if TYPE_CHECKING:
    from vblk.lab.compare import Comparison


def check_plot_support() -> None:
    """BenchError now, before any run, if matplotlib is missing."""
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib (pip install 'vblk[bench]' or matplotlib)")


def plot_sweep(c: Comparison, path: str | os.PathLike) -> None:
    """IOPS and p50 latency against queue depth, one line per backend, into a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    qds = sorted(c.sweep)
    fig, (ax_iops, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for b, marker in zip(BACKENDS, ("o", "s")):
        med = [c.medians(c.sweep[qd][b]) for qd in qds]
        ax_iops.plot(qds, [m["iops"] for m in med], marker=marker, label=b)
        ax_lat.plot(qds, [m["p50_us"] for m in med], marker=marker, label=b)
    for ax, ylabel in ((ax_iops, "IOPS (median)"), (ax_lat, "p50 latency, µs (median)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(qds, [str(q) for q in qds])
        ax.set_xlabel("queue depth")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_iops.set_ylim(bottom=0)
    ax_lat.set_yscale("log")
    ax_lat.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_lat.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    cache = "writethrough" if c.writethrough else "writeback"
    extra = " ".join(c.commands["vblk"][c.commands["vblk"].index("--log-level") + 2:])
    fig.suptitle(f"{c.sweep_label}: vblk ({extra}) vs qemu-storage-daemon, {cache}, "
                 f"medians of {c.rounds}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
