"""
Networks: how ILM frames travel between nodes.
"""

from ilm.network._memory import FaultPolicy, InMemoryNetwork, InMemoryPeerNetwork

__all__ = ["FaultPolicy", "InMemoryNetwork", "InMemoryPeerNetwork"]
