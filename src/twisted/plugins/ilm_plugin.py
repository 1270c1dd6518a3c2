"""
The ``twistd ilm`` plugin: an ILM node as a daemon (see ``ilm._twistd``).

Lazy: twistd imports ILM only when ``ilm`` is the command it runs.
"""

from twisted.application.service import ServiceMaker

ilm = ServiceMaker(
    "ILM node",
    "ilm._twistd",
    "Run an ILM node: durable, exactly-once, ordered messaging with peers.",
    "ilm",
)
