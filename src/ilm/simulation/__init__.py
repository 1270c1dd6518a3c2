"""
A deterministic chaos simulator for ILM.

It runs several real ILM nodes on one ``twisted.internet.task.Clock`` over
an in-memory network, injects faults drawn from a seed (links cut and
restored, frames dropped, duplicated and delayed, nodes crashed at any point
and restarted from what their store made durable, stores lost, delivery
targets and stores failing for a while) and checks, after every instant of
simulated time and at the end, that every stream is delivered exactly once
and in order, except in the documented at-least-once windows.

The nodes' stores can be real SQLite files (:class:`SQLiteStoreModel`) and
their links the real stream network over in-memory pipes
(:func:`stream_network`), with the faults of those layers.

``python -m ilm.simulation --seeds N`` runs seeds from the command line;
:func:`run_seed` and :func:`run_seeds` run them from code, and
:class:`Application` plugs your own delivery code and checks in.  See
``docs/simulation.md``.
"""

from ilm.simulation._gate import Gate, GateTimeout
from ilm.simulation._pipes import Switchboard
from ilm.simulation._runner import (
    SeedResult,
    Summary,
    format_failure,
    format_summary,
    main,
    replay_command,
    run_seed,
    run_seeds,
)
from ilm.simulation._sqlite import SimulatedSQLiteBackend, SQLiteStoreModel
from ilm.simulation._store import (
    CrashableBackend,
    InjectedStoreFailure,
    MemoryStoreModel,
    SimulatedBackend,
    StoreListener,
    StoreModel,
)
from ilm.simulation._stream import StreamSimulation, stream_network
from ilm.simulation._world import (
    FAULT_KINDS,
    Application,
    InjectedDeliveryFailure,
    NodeContext,
    Scenario,
    SimulatedNetwork,
    SimulationView,
    memory_network,
    random_config,
)

__all__ = [
    "FAULT_KINDS",
    "Application",
    "CrashableBackend",
    "Gate",
    "GateTimeout",
    "InjectedDeliveryFailure",
    "InjectedStoreFailure",
    "MemoryStoreModel",
    "NodeContext",
    "SQLiteStoreModel",
    "Scenario",
    "SeedResult",
    "SimulatedBackend",
    "SimulatedNetwork",
    "SimulatedSQLiteBackend",
    "SimulationView",
    "StoreListener",
    "StoreModel",
    "StreamSimulation",
    "Summary",
    "Switchboard",
    "format_failure",
    "format_summary",
    "main",
    "memory_network",
    "random_config",
    "replay_command",
    "run_seed",
    "run_seeds",
    "stream_network",
]
