"""Node agreement (antismooth/nodes.py) and the interface check (distributed.check_socket_interface), without a
cluster: descriptions of this very process, changed where a node would differ. The cluster runs them for real in
tests/test_cluster.py."""
from __future__ import annotations

import copy
import os

import pytest

from antismooth import distributed
from antismooth.distributed import Launch, LaunchError, check_socket_interface, interfaces
from antismooth.nodes import check_agreement, compared_variables, describe_node, summary


def node(host: str, **variables) -> dict:
    described = copy.deepcopy(describe_node({}))
    described["host"] = host
    described["variables"] = compared_variables(variables)
    return described


def test_this_process_describes_its_software():
    described = describe_node(os.environ)
    assert {"python", "torch", "deepspeed", "timm", "webdataset", "antismooth", "commit"} <= set(described["software"])
    assert described["software"]["deepspeed"] and described["software"]["antismooth"]


def test_agreeing_nodes_give_one_summary_line():
    nodes = [node("n1", NCCL_ALGO="Ring", GLOO_SOCKET_IFNAME="eth1"), node("n2", NCCL_ALGO="Ring",
                                                                          GLOO_SOCKET_IFNAME="ens5")]
    assert check_agreement(nodes) is None  # each node may name its own interface
    line = summary(nodes)
    assert line.startswith("2 nodes (n1, n2) agree: Python ") and "\n" not in line
    assert "GLOO_SOCKET_IFNAME=eth1 on n1, ens5 on n2" in line and "NCCL_ALGO=Ring on every node" in line


def test_a_commit_unknown_on_one_node_is_not_a_difference():
    nodes = [node("n1"), node("n2")]
    nodes[0]["software"]["commit"], nodes[1]["software"]["commit"] = "0123456789ab", None
    assert check_agreement(nodes) is None


def test_speed_and_logging_variables_are_not_compared():
    assert check_agreement([node("n1", OMP_NUM_THREADS="8", NCCL_DEBUG="INFO"), node("n2", OMP_NUM_THREADS="1")]) is None


@pytest.mark.parametrize("where, change, said", [
    ("software", ("torch", "2.0.0"), "torch 2.0.0 there, "),
    ("software", ("commit", "0123456789ab"), "commit 0123456789ab there, "),
    ("variables", ("NCCL_PROTO", "LL"), "NCCL_PROTO is 'LL' there, unset here"),
    ("variables", ("GLOO_SOCKET_IFNAME", "eth0"), "GLOO_SOCKET_IFNAME is 'eth0' there, unset here"),
])
def test_the_first_node_that_differs_is_named_with_the_difference(where, change, said):
    nodes = [node("n1"), node("n2"), node("n3"), node("n4")]
    for other in nodes[2:]:
        other[where][change[0]] = change[1]
    sentence = check_agreement(nodes)
    assert sentence.startswith(f"rank 2 on node n3 does not run what rank 0 on n1 runs: {said}")
    assert "(and 1 more rank differ)" in sentence and sentence.count(". ") == 1 and ".deepspeed_env" in sentence


ACROSS_NODES = Launch("env", 1, 2, 0, 1, 1, "127.0.0.1", 29500)


def test_an_interface_this_node_lacks_is_named_with_those_it_has():
    with pytest.raises(LaunchError) as caught:
        check_socket_interface(ACROSS_NODES, {"GLOO_SOCKET_IFNAME": "ib7"})
    assert str(caught.value).startswith("GLOO_SOCKET_IFNAME=ib7 names no interface of node ")
    assert "lo (127.0.0.1)" in str(caught.value)


def test_an_interface_that_reaches_the_master_passes():
    assert "lo" in interfaces()
    check_socket_interface(ACROSS_NODES, {"GLOO_SOCKET_IFNAME": "lo"})  # 127.0.0.1 answers (refused) through lo
    check_socket_interface(ACROSS_NODES, {})                            # nothing named: gloo's own choice


def test_an_interface_that_cannot_reach_the_master_stops(monkeypatch):
    monkeypatch.setattr(distributed, "INTERFACE_PROBE_SECONDS", 0.5)
    beyond = Launch("env", 1, 2, 0, 1, 1, "192.0.2.1", 29500)  # TEST-NET-1: never a host, not through loopback
    with pytest.raises(LaunchError) as caught:
        check_socket_interface(beyond, {"GLOO_SOCKET_IFNAME": "lo"})
    assert "cannot reach MASTER_ADDR 192.0.2.1 through GLOO_SOCKET_IFNAME=lo" in str(caught.value)
