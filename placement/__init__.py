"""Where actors run: plan a layout (pure), then reserve it as Ray placement groups.

`planner` and `cluster` import no Ray at module level, so `driver.py --dry-run` can plan on a
synthetic cluster; `placement.groups` (create_placement, Placement) needs a Ray connection.
"""

from placement.cluster import read_cluster_shape, synthetic_cluster
from placement.planner import ClusterShape, EngineSpan, Layout, NodeShape, Slot, plan_layout

__all__ = [
    "ClusterShape",
    "EngineSpan",
    "Layout",
    "NodeShape",
    "Slot",
    "plan_layout",
    "read_cluster_shape",
    "synthetic_cluster",
]
