"""
Entry point of the benchmark child processes:
``python -m benchmarks._roles ROLE OPTIONS_JSON``.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _twisted(name: str) -> Any:
    def run(options: dict[str, Any]) -> None:
        from twisted.internet import defer, task

        from benchmarks import _many_roles, _twisted_roles

        module = _many_roles if name.startswith("many_") else _twisted_roles
        role = getattr(module, name)
        task.react(lambda reactor: defer.ensureDeferred(role(reactor, options)))

    return run


def _plain(module_name: str, name: str) -> Any:
    def run(options: dict[str, Any]) -> None:
        import importlib

        module = importlib.import_module(f"benchmarks.{module_name}")
        getattr(module, name)(options)

    return run


ROLES = {
    "raw-receiver": _twisted("raw_receiver"),
    "raw-sender": _twisted("raw_sender"),
    "ilm-receiver": _twisted("ilm_receiver"),
    "ilm-sender": _twisted("ilm_sender"),
    "ilm-inproc": _twisted("ilm_inproc"),
    "many-node": _twisted("many_node"),
    "many-clients": _twisted("many_clients"),
    "mqtt-subscriber": _plain("_mqtt_roles", "subscriber"),
    "mqtt-publisher": _plain("_mqtt_roles", "publisher"),
    "js-consumer": _plain("_jetstream_roles", "consumer"),
    "js-publisher": _plain("_jetstream_roles", "publisher"),
    "backlog-build": _plain("_backlog", "build"),
    "backlog-reopen": _plain("_backlog", "reopen"),
}


PROFILED = ("ilm-sender", "ilm-receiver", "ilm-inproc", "many-node")


def main(argv: list[str]) -> None:
    role, options = argv[0], json.loads(argv[1])
    directory = options.get("profile")
    if not directory or role not in PROFILED:
        ROLES[role](options)
        return
    # --profile: the ILM processes run under cProfile, stats written on exit
    # (also when stopped with SIGTERM, which ends the reactor).
    import cProfile
    import os

    profile = cProfile.Profile()
    profile.enable()
    try:
        ROLES[role](options)
    finally:
        profile.disable()
        name = f"{role}-{options.get('mode', 'run')}-{os.getpid()}.prof"
        profile.dump_stats(os.path.join(directory, name))


if __name__ == "__main__":
    main(sys.argv[1:])
