"""The cluster in a box (tests/cluster/harness.py): `python -m tests.cluster up|down|status` by hand, the session
fixture `cluster` in tests/conftest.py for the tests."""
from .harness import (ROOT, Cluster, ClusterError, Job, Node, down, status, up, why_unavailable)

__all__ = ["ROOT", "Cluster", "ClusterError", "Job", "Node", "down", "status", "up", "why_unavailable"]
