"""
The checks of ``twistd ilm``'s options that stand on their own: TLS
material, the store, the window and the files the node will write.  Each
takes the parsed options and appends every problem it finds, one line each,
to a list (:meth:`ilm._twistd.Options.postOptions` raises them all at
once); some complete the options (``--window`` as a number, ``--gateway``
defaulted to the host name).
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from ilm._config import Config
from ilm._sidecar import exposed_secret

__all__ = [
    "DaemonOptions",
    "check_files",
    "check_store",
    "check_tls",
    "check_window",
    "is_postgres",
    "os_reason",
    "redact_dsn",
    "writable_problem",
]


class DaemonOptions(Protocol):
    """What a check reads of :class:`ilm._twistd.Options`."""

    parent: Any

    def __getitem__(self, key: str) -> Any: ...

    def __setitem__(self, key: str, value: Any) -> None: ...

    def path(self, path: str) -> str: ...


def check_tls(options: DaemonOptions, problems: list[str]) -> Any:
    """
    ``--tls-certificate``, ``--tls-key``, ``--tls-ca`` and ``--pin`` go
    together, the key is private, and the material loads.

    :return: the :class:`ilm.network.TLSCredentials`, or ``None`` (no TLS,
        or a problem).
    """
    certificate, key = options["tls-certificate"], options["tls-key"]
    if (certificate is None) != (key is None):
        problems.append("--tls-certificate and --tls-key go together")
        return None
    if certificate is None:
        if options["tls-ca"] is not None or options["pins"]:
            problems.append("--tls-ca and --pin need --tls-certificate and --tls-key")
        return None
    if not options["pins"] and options["tls-ca"] is None:
        problems.append(
            "--tls-certificate needs --pin ID=FINGERPRINT or --tls-ca to identify peers"
        )
        return None
    exposed = exposed_secret(options.path(key), "TLS private key")
    if exposed is not None:
        problems.append(exposed)
    pem: dict[str, bytes] = {}
    for option in ("tls-certificate", "tls-key", "tls-ca"):
        if options[option] is None:
            continue
        try:
            with open(options.path(options[option]), "rb") as f:
                pem[option] = f.read()
        except OSError as e:
            problems.append(
                f"--{option}: cannot read {options[option]}: {os_reason(e)}"
            )
    if len(pem) < 2 + (options["tls-ca"] is not None) or exposed is not None:
        return None
    from ilm.network import TLSCredentials

    try:
        return TLSCredentials.from_pem(
            pem["tls-certificate"],
            pem["tls-key"],
            peer_fingerprints=options["pins"],
            ca_certificates=pem.get("tls-ca"),
        )
    except (ValueError, TypeError) as e:
        problems.append(f"bad TLS material: {e}")
        return None


def check_store(options: DaemonOptions, problems: list[str]) -> None:
    """
    A PostgreSQL URI parses, and names the gateway; ``--gateway``
    without one is a mistake.
    """
    store, gateway = options["store"], options["gateway"]
    if not is_postgres(store):
        if gateway is not None:
            problems.append(
                "--gateway names a gateway sharing a PostgreSQL store: give "
                "--store postgresql://..."
            )
        return
    try:
        import psycopg
    except ImportError:
        problems.append(
            "--store postgresql://... needs psycopg 3: pip install 'ilm[postgres]'"
        )
        return
    try:
        settings = psycopg.conninfo.conninfo_to_dict(store)
    except psycopg.ProgrammingError as e:
        problems.append(f"--store {redact_dsn(store)}: {str(e).strip()}")
    else:
        port = str(settings.get("port", "5432"))
        if not all(p.isdigit() for p in port.split(",")):
            problems.append(
                f"--store {redact_dsn(store)}: port {port!r} is not a number"
            )
    if gateway is None:
        import socket

        options["gateway"] = socket.gethostname() or "gateway"
    elif not 1 <= len(gateway) <= 255 or "\x00" in gateway:
        problems.append(f"--gateway {gateway!r}: expected 1 to 255 characters")


def check_window(options: DaemonOptions, problems: list[str]) -> None:
    """
    ``--window`` is a whole number ILM accepts; it becomes an ``int``.
    """
    window = options["window"]
    if window is None:
        return
    try:
        value = int(window)
    except ValueError:
        problems.append(f"--window {window!r}: expected a whole number of messages")
        return
    if value < 1:
        problems.append(f"--window {window}: must be at least 1")
        return
    try:
        Config(window=value)
    except (ValueError, TypeError) as e:
        problems.append(f"--window {window}: {e}")
        return
    options["window"] = value


def check_files(options: DaemonOptions, problems: list[str]) -> None:
    """
    The store, the inbox and the API's token file are distinct files the
    node can create or write (or, for an existing token, read); under
    twistd's ``--chroot`` they are checked when opened instead.
    """
    parent = options.parent
    if parent is not None and parent.get("chroot"):
        return  # the paths are inside the chroot: checked when opened
    files = []
    if not is_postgres(options["store"]):
        files.append(("store", options.path(options["store"]), True))
    if options["inbox"] is not None:
        files.append(("inbox", options.path(options["inbox"]), False))
    if options["api"] is not None:
        token = options.path(options["api-token-file"])
        files.append(("api-token-file", token, not os.path.exists(token)))
    seen: dict[str, str] = {}
    for option, path, _ in files:
        other = seen.setdefault(os.path.abspath(path), option)
        if other != option:
            problems.append(f"--{other} and --{option} name the same file")
            return
    for option, path, directory_needed in files:
        if option == "api-token-file" and os.path.exists(path):
            problem = None if os.access(path, os.R_OK) else "is not readable"
        else:
            problem = writable_problem(path, directory_needed)
        if problem is not None:
            problems.append(f"--{option} {options[option]}: {problem}")


def writable_problem(path: str, directory_needed: bool) -> str | None:
    """
    :return: why ``path`` could not be created or written, or ``None``.

    :param directory_needed: the directory itself must be writable (SQLite
        creates its ``-wal``, ``-shm`` and ``-lock`` files next to the
        store).
    """
    if os.path.isdir(path):
        return "is a directory"
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"the directory {directory} does not exist"
    exists = os.path.exists(path)
    if (directory_needed or not exists) and not os.access(directory, os.W_OK | os.X_OK):
        return f"the directory {directory} is not writable"
    if exists and not os.access(path, os.W_OK):
        return "is not writable"
    return None


def os_reason(error: BaseException) -> str:
    """``error`` in words: an ``OSError``'s reason, else its text."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


def is_postgres(store: str) -> bool:
    """
    Whether ``--store`` names a PostgreSQL database rather than a file.
    """
    return store.startswith(("postgresql://", "postgres://"))


def redact_dsn(store: str) -> str:
    """
    ``store`` fit for logs and the API: a PostgreSQL URI's password
    replaced by ``***``.
    """
    if not is_postgres(store):
        return store
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(store)
    if parts.password is None:
        return store
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))
