"""Where a `ClusterShape` comes from: a running Ray cluster, or a synthetic one for dry runs."""

from placement.planner import ClusterShape, NodeShape


def read_cluster_shape() -> ClusterShape:
    """The alive nodes of the Ray cluster this process is connected to, with their totals.

    Totals, not what is free right now: the plan is checked against the cluster's size, and a
    busy cluster shows up later as a placement group that does not become ready in time.
    """
    import ray  # Imported here so the planner and dry runs never need a Ray runtime.

    nodes = []
    for info in ray.nodes():
        if not info.get("Alive"):
            continue
        resources = info.get("Resources", {})
        nodes.append(
            NodeShape(
                node_id=info["NodeID"],
                address=info["NodeManagerAddress"],
                num_gpus=int(resources.get("GPU", 0)),
                num_cpus=float(resources.get("CPU", 0)),
            )
        )
    return ClusterShape(tuple(nodes))


def synthetic_cluster(num_nodes: int, gpus_per_node: int, cpus_per_node: float) -> ClusterShape:
    """A made-up cluster of identical nodes (addresses 10.0.0.1..., ids 00000000...).

    For `driver.py --dry-run` and planner tests: plans from it are real plans, but its node ids
    match no Ray node, so it must never be handed to `create_placement`.
    """
    return ClusterShape(
        tuple(
            NodeShape(
                node_id=f"{i:08x}" + "f" * 48,
                address=f"10.0.0.{i + 1}",
                num_gpus=gpus_per_node,
                num_cpus=cpus_per_node,
            )
            for i in range(num_nodes)
        )
    )
