"""``vblk serve --config FILE``: many disks for one vblk, read from TOML and checked as a whole.

The file has a few host-wide keys and one ``[[disk]]`` table per disk::

    workers = 8                          # the one pool every disk shares (1..64)
    log-level = "info"
    control-socket = "/run/vblk/host.ctl"   # optional: `vblk stats` of every disk at once,
                                         #   `vblk disk add` and `vblk disk remove`
    slot-capacity = 8192                 # optional, with control-socket: the slots of the
                                         #   one slot area, the room for disks added later
                                         #   (default: the file's disks' + 4096)
    poll-us = 50                         # optional, as --poll-us: the loop's longest polling
                                         #   window (0: none)

    [[disk]]
    name = "vm1-root"                    # optional: default the socket's file name, no suffix
    spec = "/var/lib/vm1.img"            # the ACRN option string or a path, as `vblk serve SPEC`
    socket-path = "/run/vblk/vm1.sock"
    cache = "writeback"                  # as --cache: "writethrough" (the default) or "writeback"
    num-queues = 2                       # and every per-disk flag of `vblk serve`, flag-named:
    iops-limit = "5k"                    #   ro, cache, nocache, sectorsize, range, serial,
                                         #   num-queues, discard, discard-limits, slots,
                                         #   iops-limit, bps-limit, iops-burst, bps-burst,
                                         #   socket-mode, socket-group, control-socket,
                                         #   metrics-listen

A disk's keys mean what the flag of the same name means (``parse_disk`` turns them into the
same ``ServeConfig`` the command line makes), so one disk has one set of rules. ``cache``
overrides the option string's ``writeback``/``writethru`` as ``--cache`` does; ``nocache`` is
``--nocache`` (O_DIRECT), not a cache mode. The old key ``writeback = true|false`` (the
command line's old ``--writeback``/``--writethru``) still works: each use is one warning in
``HostConfig.warnings`` (``vblk serve`` prints them as ``vblk: warning:`` lines, naming the
disk and the new spelling); a table that gives both ``cache`` and ``writeback`` is refused.

Anything wrong -- an unknown key, a value of the wrong type, a bad option string, a missing
image, a socket path used twice, two writable disks over the same bytes of one image -- refuses
the whole file with one ConfigError naming the disk (``disk 2 (vm1-root): ...``), before any
image is opened for writing or any socket created: ``load_host_config`` parses (pure but for
reading FILE) and ``check_host_config`` looks at the images and paths (touching nothing).

A disk added at run time (``vblk disk add FILE``: FILE holds one ``[[disk]]`` table,
``load_disk_file``) is held to the same rules: ``parse_added_disk`` parses its table as
``parse_disk`` does, and ``check_added_disk`` checks it alone and then against the disks
being served as if it were the last table of their file (name, socket paths, overlapping
writable windows), touching nothing. Its paths must be absolute: the vblk that opens them
does not run in the operator's directory.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field

from vblk.errors import ConfigError
from vblk.options import (
    CACHE_MODES,
    DEFAULT_SLOTS,
    LOG_LEVELS,
    MAX_WORKERS,
    ServeConfig,
    check_poll_us,
    merge_flags,
    parse_acrn,
    parse_limits,
    parse_socket_mode,
)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_DISKS = 1024
# The slot area of a host whose disks can change has room for this many slots more than its
# config's disks take: 64 disks of the default 64 slots (each slot is vblk.ipc.SLOT_SIZE
# bytes of a memfd, touched only once used; see the README for what room costs).
DEFAULT_SLOT_ROOM = 64 * DEFAULT_SLOTS
MAX_SLOT_CAPACITY = 1 << 18

_HOST_KEYS = {"workers", "log-level", "control-socket", "slot-capacity", "poll-us", "disk"}
_BOOL_KEYS = {"ro": "readonly", "read-only": "readonly", "nocache": "nocache",
              "discard": "discard"}
_TEXT_KEYS = {"sectorsize": "sectorsize", "range": "range_", "serial": "serial",
              "discard-limits": "discard_limits"}
_LIMIT_KEYS = {"iops-limit": "iops", "bps-limit": "bps", "iops-burst": "iops_burst",
               "bps-burst": "bps_burst"}
_DISK_KEYS = ({"name", "spec", "socket-path", "socket-mode", "socket-group", "control-socket",
               "metrics-listen", "num-queues", "slots", "cache", "writeback"}
              | set(_BOOL_KEYS) | set(_TEXT_KEYS) | set(_LIMIT_KEYS))


@dataclass(frozen=True, slots=True)
class DiskEntry:
    """One disk of the host: its name (in logs, stats and errors; "" for the one disk of
    ``vblk serve SPEC``) and everything ``vblk serve`` would take for it alone."""
    name: str
    serve: ServeConfig


@dataclass(frozen=True, slots=True)
class HostConfig:
    """Every disk one supervisor serves, and what they share."""
    disks: tuple[DiskEntry, ...]
    workers: int = 8
    log_level: str = "INFO"
    control_socket: str | None = None       # host-wide stats, disk add/remove; None: none
    slot_capacity: int | None = None        # slots of the shared area; see slot_area_size
    poll_us: int | None = None              # the loop's longest polling window; None: default
    # Old spellings the file used, one line each ("FILE: disk N (NAME): writeback = true is
    # deprecated ..."), for ``vblk serve`` to print; they change nothing else.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    listen_fd = None                        # a host listens on the disks' own sockets

    @classmethod
    def single(cls, config: ServeConfig) -> HostConfig:
        """``vblk serve SPEC``: a host of one disk, with no name."""
        return cls((DiskEntry("", config),), workers=config.workers, log_level=config.log_level,
                   poll_us=config.poll_us)


def slot_area_size(host: HostConfig, needed: int) -> int:
    """The slots of the shared slot area: ``needed`` (the slots of the disks served from the
    start) -- or, with a host control socket, where ``vblk disk add`` may bring more, the
    ``slot-capacity`` (at least ``needed``), by default ``needed`` + DEFAULT_SLOT_ROOM."""
    if host.control_socket is None:
        return needed
    if host.slot_capacity is None:
        return needed + DEFAULT_SLOT_ROOM
    return max(needed, host.slot_capacity)


def load_host_config(path: str) -> HostConfig:
    """Read and parse FILE (ConfigError for anything wrong in it)."""
    return parse_host_config(_read_toml(path, "--config "), where=path)


def load_disk_file(path: str) -> dict:
    """``vblk disk add FILE``: the one ``[[disk]]`` table FILE holds, as tomllib reads it
    (ConfigError if FILE holds anything else, or a date or time, which no disk key takes and
    the control socket does not carry). Its keys are checked by ``parse_added_disk``."""
    data = _read_toml(path, "")
    tables = data.get("disk")
    if set(data) != {"disk"} or not isinstance(tables, list) or len(tables) != 1 \
            or not isinstance(tables[0], dict):
        raise ConfigError(f"{path}: a disk file holds one [[disk]] table and nothing else "
                          f"(the host's keys stay in its config)")
    for key, value in tables[0].items():
        if not _plain(value):
            raise ConfigError(f"{path}: {key} = {value!r} is not a value any disk key takes")
    return tables[0]


def _read_toml(path: str, flag: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{flag}{path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{flag}{path}: not valid TOML: {exc}") from None


def _plain(value: object) -> bool:
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(v) for v in value.values())
    return isinstance(value, (str, int, float, bool))


def parse_host_config(data: dict, where: str = "config") -> HostConfig:
    """The TOML document (as tomllib returns it) -> HostConfig; pure."""
    unknown = sorted(set(data) - _HOST_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (host keys: "
                          f"{', '.join(sorted(_HOST_KEYS))})")
    workers = _typed(data.get("workers", 8), int, "workers", where)
    log_level = _typed(data.get("log-level", "info"), str, "log-level", where).upper()
    check_host_values(workers, log_level, f"{where}: ")
    control = data.get("control-socket")
    if control is not None:
        control = _typed(control, str, "control-socket", where)
        if not control:
            raise ConfigError(f"{where}: control-socket is empty")
    tables = data.get("disk")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{where}: no disk: give one [[disk]] table per disk")
    if len(tables) > MAX_DISKS:
        raise ConfigError(f"{where}: {len(tables)} disks; at most {MAX_DISKS}")
    disks = []
    warnings: list[str] = []
    for index, table in enumerate(tables, 1):
        label = _label(index, table)
        deprecated: list[str] = []
        try:
            disks.append(parse_disk(table, index, workers, log_level, deprecated))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {label}: {exc}") from None
        warnings += [f"{where}: {label}: {line}" for line in deprecated]
    capacity = _slot_capacity(data, control, disks, where)
    poll_us = data.get("poll-us")
    if poll_us is not None:
        poll_us = _typed(poll_us, int, "poll-us", where)
        check_poll_us(poll_us, f"{where}: poll-us")
    host = HostConfig(tuple(disks), workers=workers, log_level=log_level, control_socket=control,
                      slot_capacity=capacity, poll_us=poll_us, warnings=tuple(warnings))
    _check_distinct([(f"disk {i} ({e.name})", e) for i, e in enumerate(disks, 1)], control, where)
    return host


def _slot_capacity(data: dict, control: str | None, disks: list[DiskEntry],
                   where: str) -> int | None:
    if "slot-capacity" not in data:
        return None
    capacity = _typed(data["slot-capacity"], int, "slot-capacity", where)
    if control is None:
        raise ConfigError(f"{where}: slot-capacity means nothing without control-socket (no "
                          f"disk can be added)")
    from vblk.backing.rbd_spec import is_rbd
    needed = sum(d.serve.slots for d in disks if not is_rbd(d.serve.disk.path))
    if not needed <= capacity <= MAX_SLOT_CAPACITY:
        raise ConfigError(f"{where}: slot-capacity {capacity} is out of range {needed}.."
                          f"{MAX_SLOT_CAPACITY} (at least the slots of the file's disks)")
    return capacity


def check_host_values(workers: int, log_level: str, prefix: str) -> None:
    if not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"{prefix}workers {workers} is out of range 1..{MAX_WORKERS}")
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"{prefix}log level {log_level.lower()!r} is not one of "
                          f"{', '.join(LOG_LEVELS).lower()}")


def parse_disk(table: object, index: int, workers: int, log_level: str,
               deprecated: list[str] | None = None) -> DiskEntry:
    """One ``[[disk]]`` table -> DiskEntry (ConfigError without the disk's label); an old
    spelling it uses adds one line to ``deprecated``."""
    if not isinstance(table, dict):
        raise ConfigError("a [[disk]] entry must be a table")
    unknown = sorted(set(table) - _DISK_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}")
    for key in ("spec", "socket-path"):
        if key not in table:
            raise ConfigError(f"{key} is missing")
    spec = _typed(table["spec"], str, "spec")
    socket_path = _typed(table["socket-path"], str, "socket-path")
    flags: dict = {v: _typed(table[k], bool, k) for k, v in _BOOL_KEYS.items() if k in table}
    flags.update({v: _text(table[k], k) for k, v in _TEXT_KEYS.items() if k in table})
    if "num-queues" in table:
        flags["num_queues"] = _typed(table["num-queues"], int, "num-queues")
    flags["writeback"] = _cache_writeback(table, deprecated)
    disk = merge_flags(parse_acrn(spec), **flags)
    limits = parse_limits(**{v: _text(table[k], k) for k, v in _LIMIT_KEYS.items() if k in table})
    serve = ServeConfig(
        disk=disk, socket_path=socket_path, workers=workers, log_level=log_level,
        slots=_typed(table.get("slots", DEFAULT_SLOTS), int, "slots"),
        control_socket=_optional_text(table, "control-socket"),
        metrics_listen=_optional_text(table, "metrics-listen"),
        socket_mode=parse_socket_mode(_text(table.get("socket-mode", "0600"), "socket-mode")),
        socket_group=_optional_text(table, "socket-group"), limits=limits)
    name = table.get("name")
    if name is None:
        name = os.path.basename(socket_path).rpartition(".")[0] or os.path.basename(socket_path)
        name = name if NAME_RE.fullmatch(name) else f"disk{index}"
    elif not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"name {name!r} must be 1..64 of A-Z a-z 0-9 _ . - (not starting "
                          f"with _ . -)")
    return DiskEntry(name, serve)


def _cache_writeback(table: dict, deprecated: list[str] | None) -> bool | None:
    """``cache = "MODE"`` (or the old ``writeback = true|false``) as writeback True/False, None
    if neither is given: what ``--cache`` (or ``--writeback``/``--writethru``) means."""
    cache = _typed(table["cache"], str, "cache") if "cache" in table else None
    if cache is not None and cache not in CACHE_MODES:
        raise ConfigError(f"cache = {cache!r}: give " + " or ".join(f'"{m}"' for m in CACHE_MODES))
    if "writeback" in table:
        old = _typed(table["writeback"], bool, "writeback")
        old_text = f"writeback = {str(old).lower()}"
        old_cache = "writeback" if old else "writethrough"
        if cache is not None:
            raise ConfigError(f"cache = {cache!r} and its old spelling {old_text} are both "
                              f"given: give cache only")
        if deprecated is not None:
            deprecated.append(f"{old_text} is deprecated (it still works): use "
                              f'cache = "{old_cache}"')
        cache = old_cache
    return None if cache is None else cache == "writeback"


def _check_distinct(disks: list[tuple[str, DiskEntry]], host_control: str | None,
                    where: str) -> None:
    """No two disks (labelled) share a name, a socket, a control socket or a metrics
    address, and none uses the host's control socket."""
    seen: dict[tuple[str, str], str] = {}
    if host_control is not None:
        seen[("path", os.path.abspath(host_control))] = "the host's control-socket"
    for label, entry in disks:
        s = entry.serve
        control = s.control_socket or s.socket_path + ".ctl"
        keys = [("name", entry.name, "name"), ("path", os.path.abspath(s.socket_path), "socket-path"),
                ("path", os.path.abspath(control), "control-socket")]
        if s.metrics_listen is not None:
            keys.append(("metrics", s.metrics_listen, "metrics-listen"))
        for kind, value, key in keys:
            other = seen.get((kind, value))
            if other is not None:
                raise ConfigError(f"{where}: {label}: {key} {value} is already {other}")
            seen[(kind, value)] = f"{label}'s {key}"


def check_host_config(host: HostConfig, where: str = "config") -> None:
    """Every check ``vblk serve`` makes for each disk (image, range, lock, socket paths),
    touching nothing, and that no two disks write the same bytes of one image."""
    from vblk.backing import check_backing
    windows: list[Window] = []
    if host.control_socket is not None:
        from vblk.control import check_control_path
        try:
            check_control_path(host.control_socket)
        except ConfigError as exc:
            raise ConfigError(f"{where}: control-socket: {exc}") from None
    for index, entry in enumerate(host.disks, 1):
        label = f"disk {index} ({entry.name})"
        try:
            info = check_backing(entry.serve.disk)
            check_disk_paths(entry.serve)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {label}: {exc}") from None
        window = Window.of(entry, info, label)
        window.check_apart(windows, where)
        windows.append(window)


@dataclass(frozen=True, slots=True)
class Window:
    """The bytes of an image one disk serves, as the overlap rule sees them."""
    image: object                      # _image_identity of its path
    start: int
    end: int
    readonly: bool
    label: str
    path: str

    @classmethod
    def of(cls, entry: DiskEntry, info, label: str) -> Window:
        return cls(_image_identity(entry.serve.disk.path), info.start, info.start + info.size,
                   info.readonly, label, entry.serve.disk.path)

    def check_apart(self, others: list[Window], where: str) -> None:
        """ConfigError if this window and one of ``others`` share bytes of one image and
        either is writable."""
        for other in others:
            if other.image == self.image and self.start < other.end and other.start < self.end \
                    and not (self.readonly and other.readonly):
                raise ConfigError(f"{where}: {self.label}: its window of {self.path} overlaps "
                                  f"{other.label}'s and one of them is writable")


def parse_added_disk(table: object, number: int, host: HostConfig, where: str,
                     warnings: list[str] | None = None) -> tuple[DiskEntry, str]:
    """A ``[[disk]]`` table added at run time as disk ``number`` (0-based) of ``host`` -> its
    entry and its label (``disk N (NAME)``); ConfigError as for a table of the config. An old
    spelling it uses adds a line to ``warnings``, as the config's do."""
    label = _label(number + 1, table)
    deprecated: list[str] = []
    try:
        entry = parse_disk(table, number + 1, host.workers, host.log_level, deprecated)
        _check_absolute(entry)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {label}: {exc}") from None
    if warnings is not None:
        warnings += [f"{where}: {label}: {line}" for line in deprecated]
    return entry, f"disk {number + 1} ({entry.name})"


def check_added_disk(entry: DiskEntry, label: str, served: list[tuple[str, DiskEntry, object]],
                     host: HostConfig, where: str):
    """A disk to be added to the ``served`` ones ((label, entry, BackingInfo) each): its own
    checks and the file's rules between disks, as if it were the last table of their file,
    touching nothing. Its BackingInfo; ConfigError naming it."""
    from vblk.backing import check_backing
    if len(served) >= MAX_DISKS:
        raise ConfigError(f"{where}: {label}: {len(served)} disks are served; at most {MAX_DISKS}")
    _check_distinct([(lb, e) for lb, e, _ in served] + [(label, entry)], host.control_socket,
                    where)
    try:
        info = check_backing(entry.serve.disk, lock=False)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {label}: {exc}") from None
    # Before the lock is asked about: a served disk's lock would be "another process's".
    Window.of(entry, info, label).check_apart([Window.of(e, i, lb) for lb, e, i in served],
                                              where)
    try:
        info = check_backing(entry.serve.disk)
        check_disk_paths(entry.serve)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {label}: {exc}") from None
    return info


def _check_absolute(entry: DiskEntry) -> None:
    from vblk.backing.rbd_spec import is_rbd
    s = entry.serve
    paths = [("socket-path", s.socket_path), ("control-socket", s.control_socket)]
    if not is_rbd(s.disk.path):
        paths.append(("spec", s.disk.path))
    for key, path in paths:
        if path is not None and not os.path.isabs(path):
            raise ConfigError(f"{key}: {path} is a relative path: a disk added at run time "
                              f"names its files by absolute paths (vblk would look for them in "
                              f"its own directory, not yours)")


def check_disk_paths(config: ServeConfig) -> None:
    """The checks ``vblk serve`` makes of a disk's socket, control socket, metrics address and
    socket group (ConfigError; nothing is created)."""
    import grp

    from vblk.control import check_control_path, check_unix_socket_path, parse_listen_address
    check_unix_socket_path(config.socket_path)
    if config.control_socket is not None:
        if not config.control_socket:
            raise ConfigError("control-socket is empty")
        if os.path.abspath(config.control_socket) == os.path.abspath(config.socket_path):
            raise ConfigError("control-socket must differ from socket-path")
        check_control_path(config.control_socket)
    if config.metrics_listen is not None:
        parse_listen_address(config.metrics_listen)
    if config.socket_group is not None:
        try:
            grp.getgrnam(config.socket_group)
        except KeyError:
            raise ConfigError(f"socket-group {config.socket_group!r}: no such group") from None


def _image_identity(path: str) -> object:
    try:
        st = os.stat(path)
    except OSError:
        return ("name", path)          # an RBD image: its name is its identity
    return ("inode", st.st_dev, st.st_ino)


def _label(index: int, table: object) -> str:
    name = table.get("name") if isinstance(table, dict) else None
    if name is None and isinstance(table, dict) and isinstance(table.get("socket-path"), str):
        name = os.path.basename(table["socket-path"]).rpartition(".")[0] or None
    return f"disk {index}" + (f" ({name})" if isinstance(name, str) and name else "")


_KIND_NAMES = {bool: "true or false", int: "an integer", str: "a string"}


def _typed(value: object, kind: type, key: str, where: str | None = None):
    # bool is an int to Python; TOML keeps them apart and so does vblk.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}{key} = {value!r} is not {_KIND_NAMES[kind]}")
    return value


def _text(value: object, key: str) -> str:
    """A value that the command line takes as text: a string, or a TOML integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _typed(value, str, key)


def _optional_text(table: dict, key: str) -> str | None:
    return _typed(table[key], str, key) if key in table else None
