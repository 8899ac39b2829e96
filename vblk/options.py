"""What the operator asked for: ACRN's option string and vblk's flags, parsed and validated once.

Pure: nothing here touches a file.  ``parse_acrn`` reads ACRN's device string
(``[iothread,][mq=N,]PATH[,writeback|writethru][,ro][,nocache][,discard[=A:B:C]]
[,sectorsize=L[/P]][,range=S/N]``),
``merge_flags`` lays the command-line flags over it, and both return a frozen ``DiskOptions``
whose ``__post_init__`` is the one place every rule is checked.  ``ServeConfig`` adds what
``vblk serve`` needs besides the disk.

Deliberate differences from ACRN's parser (``blockif_open``), all stricter:

* tokens are matched exactly: ACRN's prefix match accepts ``discardfoo`` and ``rangefoo=1/2``;
* a path that merely contains ``nodisk`` is a path (ACRN's ``strstr`` makes it a dummy disk);
* ``sectorsize=`` and ``range=`` may each be given once, and empty tokens are refused;
* options vblk does not implement (no_bst_block, aio=) are refused by name
  rather than half-honoured;
* ``mq=N`` is the number of queues vblk offers (at most ``MAX_QUEUES``); ACRN clamps it to the
  guest's vCPU count, which a vhost-user backend does not know (Linux uses at most one queue
  per vCPU itself);
* ``discard=A:B:C`` must give a usable device: A (max sectors per segment) and B (segments
  per request, at most 256) at least 1, C (sector alignment) 0 or whole logical blocks.
  ACRN takes any three integers, and a 0 there makes Linux send discards the device refuses.

Units: ACRN's ``range=S/N`` counts logical sectors (S×L, N×L bytes, with the final L whatever
order the tokens come in); the ``--range START/SIZE`` flag counts bytes.  ``DiskOptions``
always holds bytes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from vblk.errors import ConfigError
from vblk.ratelimit import Limits
from vblk.units import parse_size

BLOCK_SIZES = (512, 1024, 2048, 4096)      # allowed logical and physical block sizes
SERIAL_MAX_BYTES = 20                      # virtio-blk GET_ID answer
MAX_WORKERS = 64
MAX_POLL_US = 10_000                       # --poll-us: the longest polling window, µs
MAX_SLOTS = 32768                          # --slots: request slots shared by all rings
DEFAULT_SLOTS = 64
MAX_QUEUES = 64                            # virtqueues (mq=N, --num-queues)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
CACHE_MODES = ("writethrough", "writeback")  # --cache MODE, a config's cache = "MODE"

ACRN_SYNTAX = ("[iothread,][mq=N,]PATH[,writeback|writethru][,ro][,nocache]"
               "[,discard[=A:B:C]][,sectorsize=L[/P]][,range=START/COUNT]")

# Options ACRN has and vblk does not (yet): refused by name, never silently dropped.
_NOT_YET = {
    "no_bst_block": "option 'no_bst_block' is not supported yet",
}
U32_MAX = 0xFFFF_FFFF
MAX_DISCARD_SEGMENTS = 256                 # Linux's MAX_DISCARD_SEGMENTS
_AIO = "aio= does not apply to vblk: workers use synchronous I/O"
_COUNT_SUFFIX = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3}
_COUNT_RE = re.compile(r"([0-9]+)([KMG]?)", re.IGNORECASE)


def default_max_discard_sectors(size_bytes: int) -> int:
    """ACRN's default max_discard_sectors: the whole disk, as far as the u32 field reaches."""
    return min(size_bytes // 512, U32_MAX)


@dataclass(frozen=True, slots=True)
class DiscardOption:
    """ACRN's ``discard[=A:B:C]``: max sectors per segment (None: the disk's size in sectors,
    clamped to u32, decided when the image is open), segments per request, and the sector
    alignment a segment must start on (0: none)."""
    max_sectors: int | None = None
    max_segments: int = 1
    alignment: int = 0

    def __post_init__(self) -> None:
        if self.max_sectors is not None and not 1 <= self.max_sectors <= U32_MAX:
            raise ConfigError(f"discard max sectors {self.max_sectors} is outside 1..{U32_MAX}")
        if not 1 <= self.max_segments <= MAX_DISCARD_SEGMENTS:
            raise ConfigError(f"discard max segments {self.max_segments} is outside "
                              f"1..{MAX_DISCARD_SEGMENTS}")
        if not 0 <= self.alignment <= U32_MAX:
            raise ConfigError(f"discard alignment {self.alignment} is outside 0..{U32_MAX}")


@dataclass(frozen=True, slots=True)
class DiskOptions:
    """One disk as the operator described it (no file has been looked at yet).

    ``physical_block_size`` None means "decide when opening": st_blksize for a file,
    BLKPBSZGET for a block device, never below the logical size.  ``range_size`` None
    means "to the end of the image".  ``spec_options`` names the options the ACRN string
    gave explicitly (so ``merge_flags`` can refuse the same option twice).
    """
    path: str
    readonly: bool = False
    writeback: bool = False
    nocache: bool = False
    logical_block_size: int = 512
    physical_block_size: int | None = None
    range_start: int = 0
    range_size: int | None = None
    serial: str | None = None
    num_queues: int = 1
    discard: DiscardOption | None = None      # None: DISCARD not offered
    spec_options: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError("no image path given")
        if "\0" in self.path:
            raise ConfigError(f"image path {self.path!r} contains a NUL byte")
        check_block_sizes(self.logical_block_size, self.physical_block_size, "sector size")
        lbs = self.logical_block_size
        if self.range_start < 0:
            raise ConfigError(f"range start {self.range_start} is negative")
        if self.range_start % lbs:
            raise ConfigError(f"range start byte {self.range_start} is not a whole number of "
                              f"{lbs}-byte logical sectors")
        if self.range_size is not None:
            if self.range_size <= 0:
                raise ConfigError(f"range size {self.range_size} must be at least one logical "
                                  f"sector ({lbs} bytes)")
            if self.range_size % lbs:
                raise ConfigError(f"range size {self.range_size} bytes is not a whole number of "
                                  f"{lbs}-byte logical sectors")
        if self.serial is not None:
            check_serial(self.serial)
        if not isinstance(self.num_queues, int) or not 1 <= self.num_queues <= MAX_QUEUES:
            raise ConfigError(f"the number of queues ({self.num_queues}) must be 1..{MAX_QUEUES}")
        if self.discard is not None:
            for what, sectors in (("max sectors", self.discard.max_sectors),
                                  ("alignment", self.discard.alignment)):
                if sectors and sectors * 512 % lbs:
                    raise ConfigError(f"discard {what} {sectors} (512-byte sectors) is not a whole "
                                      f"number of {lbs}-byte logical blocks")

    @property
    def cache_mode(self) -> str:
        return "writeback" if self.writeback else "writethrough"


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything ``vblk serve`` needs; ``vblk.supervisor.serve`` takes it as is."""
    disk: DiskOptions
    socket_path: str | None = None
    listen_fd: int | None = None
    workers: int = 8
    slots: int = DEFAULT_SLOTS              # --slots: requests in flight, all rings
    log_level: str = "INFO"
    control_socket: str | None = None     # None: the listening socket's path + ".ctl"
    metrics_listen: str | None = None     # "HOST:PORT" for Prometheus, None: off
    socket_mode: int = 0o600                # permissions of a socket vblk creates
    socket_group: str | None = None         # group of a socket vblk creates
    limits: Limits = Limits()               # --iops-limit / --bps-limit (0: unlimited)
    incoming: bool = False                  # a migration's destination: lock at rings start
    poll_us: int | None = None              # --poll-us: longest polling window (None: default)

    def __post_init__(self) -> None:
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError(f"--socket-mode {self.socket_mode:o} is not a permission mode")
        if (self.socket_path is None) == (self.listen_fd is None):
            raise ConfigError("give exactly one of --socket-path and --fd")
        if self.socket_path is not None and not self.socket_path:
            raise ConfigError("--socket-path is empty")
        if self.listen_fd is not None and self.listen_fd < 0:
            raise ConfigError(f"--fd {self.listen_fd} is not a file descriptor")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError(f"--workers {self.workers} is out of range 1..{MAX_WORKERS}")
        if not (1 <= self.slots <= MAX_SLOTS and _is_power_of_two(self.slots)):
            raise ConfigError(f"--slots {self.slots} must be a power of two "
                              f"in 1..{MAX_SLOTS}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log level {self.log_level!r} is not one of "
                              f"{', '.join(LOG_LEVELS).lower()}")
        check_poll_us(self.poll_us, "--poll-us")


def check_poll_us(poll_us: int | None, what: str) -> None:
    """``--poll-us`` / ``poll-us``: None (the default window) or 0..MAX_POLL_US."""
    if poll_us is not None and not 0 <= poll_us <= MAX_POLL_US:
        raise ConfigError(f"{what} {poll_us} is out of range 0..{MAX_POLL_US} (microseconds; "
                          f"0: no polling)")


# -- validation shared by the parser and the dataclass ------------------------------------

def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_block_sizes(logical: int, physical: int | None, where: str) -> None:
    """Raise ConfigError unless L (and P, if given) are powers of two in 512..4096, P ≥ L."""
    for name, value in (("logical", logical), ("physical", physical)):
        if value is None:
            continue
        if not _is_power_of_two(value):
            raise ConfigError(f"{where}: {name} block size {value} is not a power of two")
        if value not in BLOCK_SIZES:
            raise ConfigError(f"{where}: {name} block size {value} is outside 512..4096")
    if physical is not None and physical < logical:
        raise ConfigError(f"{where}: physical block size {physical} is smaller than the "
                          f"logical block size {logical}")


def check_serial(serial: str) -> None:
    if not serial:
        raise ConfigError("serial is empty")
    if not all(0x20 <= ord(c) < 0x7F for c in serial):
        raise ConfigError(f"serial {serial!r} must be printable ASCII")
    if len(serial) > SERIAL_MAX_BYTES:
        raise ConfigError(f"serial {serial!r} is {len(serial)} bytes; virtio-blk allows at "
                          f"most {SERIAL_MAX_BYTES}")


def _int(text: str, what: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ConfigError(f"{what}: {text!r} is not a decimal number")
    return int(text)


def parse_sectorsize(value: str, where: str) -> tuple[int, int | None]:
    """``L`` or ``L/P`` -> (L, P or None), checked; ``where`` names the option in errors."""
    logical_text, slash, physical_text = value.partition("/")
    if not logical_text or (slash and not physical_text):
        raise ConfigError(f"{where}: want L or L/P (e.g. 512 or 512/4096)")
    logical = _int(logical_text, where)
    physical = _int(physical_text, where) if slash else None
    check_block_sizes(logical, physical, where)
    return logical, physical


def parse_discard(value: str, where: str) -> DiscardOption:
    """ACRN's ``A:B:C`` (exactly three decimal integers) -> DiscardOption, checked."""
    parts = value.split(":")
    if len(parts) != 3:
        raise ConfigError(f"{where}: want A:B:C (max sectors : max segments : sector "
                          f"alignment), three decimal numbers")
    numbers = [_int(p, where) for p in parts]
    try:
        return DiscardOption(*numbers)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_count(text: str, what: str) -> int:
    """A whole number with an optional K/M/G suffix (powers of 1000): ``2000``, ``2k``.

    Not ``parse_size``: a count of requests per second is decimal, as IOPS figures (and
    QEMU's ``x-iops-total``) are, while every byte size vblk takes is binary (K = 1024).
    So ``--iops-limit 2k`` is 2000 requests and ``--bps-limit 2K`` is 2048 bytes."""
    m = _COUNT_RE.fullmatch(text.strip())
    if not m:
        raise ConfigError(f"{what}: {text!r} is not a whole number (optionally with k/M/G)")
    return int(m.group(1)) * _COUNT_SUFFIX[m.group(2).upper()]


def parse_limits(*, iops: str | None = None, bps: str | None = None,
                 iops_burst: str | None = None, bps_burst: str | None = None,
                 burst_needs_rate: bool = True) -> Limits | dict:
    """Rate limits as the operator typed them -> ``Limits`` (0 or absent: unlimited).

    IOPS and the IOPS burst are counts (k/M/G = powers of 1000); bytes/s and the byte burst are
    sizes (K/M/G/T = powers of 1024, like every size vblk takes).  Errors name the flags as
    every command spells them (``--iops-limit``, ``--bps-limit``, ``--iops-burst``,
    ``--bps-burst``).  With ``burst_needs_rate`` False (a change to a running vblk, whose
    rate is kept) a burst may come alone, and the answer is a dict of just the values given."""
    name = {"iops": "--iops-limit", "bps": "--bps-limit", "iops_burst": "--iops-burst",
            "bps_burst": "--bps-burst"}
    values = {
        "iops": 0 if iops is None else parse_count(iops, f"{name['iops']} {iops}"),
        "bps": 0 if bps is None else parse_size(bps.strip(), f"{name['bps']} {bps}"),
        "iops_burst": None if iops_burst is None
        else parse_count(iops_burst, f"{name['iops_burst']} {iops_burst}"),
        "bps_burst": None if bps_burst is None
        else parse_size(bps_burst.strip(), f"{name['bps_burst']} {bps_burst}"),
    }
    for kind in ("iops", "bps"):
        burst = values[f"{kind}_burst"]
        if burst is not None and not values[kind] and burst_needs_rate:
            raise ConfigError(f"{name[kind + '_burst']} needs {name[kind]} (a burst of an "
                              f"unlimited rate means nothing)")
        if burst is not None and burst < 1:
            raise ConfigError(f"{name[kind + '_burst']} {burst} must be at least 1")
    if not burst_needs_rate:
        given = {"iops": iops, "bps": bps, "iops_burst": iops_burst, "bps_burst": bps_burst}
        return {k: v for k, v in values.items() if given[k] is not None}
    return Limits(**values)


# -- ACRN's option string -------------------------------------------------------------------

def _leading_token(token: str, values: dict) -> bool:
    """Handle one of ACRN's tokens that come before the path; False if ``token`` isn't one."""
    if token == "iothread":
        return True            # vhost-user kicks never run on a vCPU thread: nothing to do
    if token.startswith("iothread="):
        raise ConfigError(f"option {token!r} is not supported yet (a bare 'iothread' is "
                          f"accepted and changes nothing)")
    if token == "mq" or token.startswith("mq="):
        values["num_queues"] = _parse_mq(token)
        return True
    return False


def _parse_mq(token: str) -> int:
    """``mq`` (one queue, as in ACRN) or ``mq=N``."""
    if token == "mq":
        return 1
    n = _int(token[3:], token)
    if not 1 <= n <= MAX_QUEUES:
        raise ConfigError(f"{token}: the number of queues must be 1..{MAX_QUEUES}")
    return n


def parse_acrn(spec: str) -> DiskOptions:
    """ACRN's ``virtio-blk`` device string -> DiskOptions.  Raises ConfigError naming the problem."""
    tokens = spec.split(",")
    if any(t == "" for t in tokens[1:]):
        raise ConfigError(f"empty option in {spec!r}")
    values: dict = {}
    given: set[str] = set()
    while tokens and _leading_token(tokens[0], values):
        if tokens[0].startswith("mq"):
            given.add("mq")
        tokens.pop(0)
    if not tokens or not tokens[0]:
        raise ConfigError(f"no image path in {spec!r} (syntax: {ACRN_SYNTAX})")
    path, options = tokens[0], tokens[1:]
    if path == "nodisk":
        raise ConfigError("'nodisk' placeholder disks are not supported yet "
                          "(for an image named nodisk, write ./nodisk)")
    sectorsize: tuple[int, int | None] | None = None
    range_sectors: tuple[int, int] | None = None
    for token in options:
        name, eq, value = token.partition("=")
        if token in ("writeback", "writethru"):
            values["writeback"] = token == "writeback"        # the last one wins, as in ACRN
            given.add("writeback")
        elif token == "ro":
            values["readonly"] = True
            given.add("ro")
        elif token == "nocache":
            values["nocache"] = True
            given.add("nocache")
        elif name == "sectorsize" and eq:
            if sectorsize is not None:
                raise ConfigError(f"sectorsize= is given twice in {spec!r}")
            sectorsize = parse_sectorsize(value, token)
            given.add("sectorsize")
        elif name == "range" and eq:
            if range_sectors is not None:
                raise ConfigError(f"range= is given twice in {spec!r}")
            range_sectors = _parse_acrn_range(value, token)
            given.add("range")
        elif name == "discard":
            if "discard" in given:
                raise ConfigError(f"discard is given twice in {spec!r}")
            values["discard"] = parse_discard(value, token) if eq else DiscardOption()
            given.add("discard")
        elif token in _NOT_YET:
            raise ConfigError(_NOT_YET[name])
        elif name == "aio" and eq:
            raise ConfigError(_AIO)
        elif token == "iothread" or name in ("iothread", "mq"):
            raise ConfigError(f"option {token!r} must come before the path "
                              f"(syntax: {ACRN_SYNTAX})")
        else:
            raise ConfigError(f"unknown option {token!r} in {spec!r} (syntax: {ACRN_SYNTAX})")
    if sectorsize is not None:
        values["logical_block_size"], values["physical_block_size"] = sectorsize
    if range_sectors is not None:               # sectors -> bytes with the final L
        lbs = values.get("logical_block_size", 512)
        values["range_start"] = range_sectors[0] * lbs
        values["range_size"] = range_sectors[1] * lbs
    return DiskOptions(path, spec_options=frozenset(given), **values)


def _parse_acrn_range(value: str, where: str) -> tuple[int, int]:
    start_text, slash, count_text = value.partition("/")
    if not slash or not start_text or not count_text:
        raise ConfigError(f"{where}: want range=START/COUNT in logical sectors")
    start, count = _int(start_text, where), _int(count_text, where)
    if count < 1:
        raise ConfigError(f"{where}: the sector count must be at least 1")
    return start, count


# -- command-line flags on top --------------------------------------------------------------

def merge_flags(opts: DiskOptions, *, readonly: bool | None = None,
                writeback: bool | None = None, sectorsize: str | None = None,
                range_: str | None = None, serial: str | None = None,
                nocache: bool | None = None, num_queues: int | None = None,
                discard: bool | None = None, discard_limits: str | None = None) -> DiskOptions:
    """Lay CLI flags over ``opts``; None leaves a setting alone.

    Flags override the string, except that ``sectorsize`` and ``range`` may not be given
    both ways.  ``sectorsize`` is ``L`` or ``L/P``; ``range_`` is ``START/SIZE`` in bytes
    (K/M/G/T suffixes), each a whole number of logical sectors.  A ``range=S/N`` from the
    string keeps counting logical sectors, so a ``--sectorsize`` flag rescales it, just as
    ACRN applies L after all options.  ``discard`` turns DISCARD on (keeping the string's
    limits, if any) or off; ``discard_limits`` is ``A:B:C`` as in ACRN's ``discard=A:B:C``
    and turns it on with those limits.
    """
    changes: dict = {}
    if discard_limits is not None:
        if discard is False:
            raise ConfigError("--no-discard and --discard-limits contradict each other")
        changes["discard"] = parse_discard(discard_limits, f"--discard-limits {discard_limits}")
    elif discard is not None:
        changes["discard"] = (opts.discard or DiscardOption()) if discard else None
    for name, value in (("readonly", readonly), ("writeback", writeback),
                        ("nocache", nocache), ("serial", serial)):
        if value is not None:
            changes[name] = value
    if num_queues is not None:
        if "mq" in opts.spec_options:
            raise ConfigError(f"the number of queues is given twice: mq= in the option string "
                              f"and --num-queues {num_queues}; give it once")
        changes["num_queues"] = num_queues
    lbs = opts.logical_block_size
    if sectorsize is not None:
        if "sectorsize" in opts.spec_options:
            raise ConfigError(f"the sector size is given twice: sectorsize= in the option string "
                              f"and --sectorsize {sectorsize}; give it once")
        lbs, changes["physical_block_size"] = parse_sectorsize(sectorsize, f"--sectorsize {sectorsize}")
        changes["logical_block_size"] = lbs
        if "range" in opts.spec_options:
            old = opts.logical_block_size
            changes["range_start"] = opts.range_start // old * lbs
            changes["range_size"] = opts.range_size // old * lbs
    if range_ is not None:
        if "range" in opts.spec_options:
            raise ConfigError(f"the range is given twice: range= in the option string and "
                              f"--range {range_}; give it once")
        changes["range_start"], changes["range_size"] = _parse_flag_range(range_, lbs)
    return replace(opts, **changes) if changes else opts


def _parse_flag_range(value: str, lbs: int) -> tuple[int, int]:
    where = f"--range {value}"
    start_text, slash, size_text = value.partition("/")
    if not slash:
        raise ConfigError(f"{where}: want START/SIZE in bytes (e.g. 1M/16G)")
    start, size = parse_size(start_text, where), parse_size(size_text, where)
    for name, n in (("start", start), ("size", size)):
        if n % lbs:
            raise ConfigError(f"{where}: {name} {n} bytes is not a whole number of "
                              f"{lbs}-byte logical sectors")
    if size == 0:
        raise ConfigError(f"{where}: the size must be at least one logical sector ({lbs} bytes)")
    return start, size


def parse_socket_mode(text: str) -> int:
    """An octal permission mode such as 0600 or 660."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError(f"--socket-mode {text!r} is not an octal mode like 0660") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"--socket-mode {text!r} is not a permission mode (0..0777)")
    return mode
