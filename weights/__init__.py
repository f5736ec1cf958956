"""The weight path: bucketed broadcast of new weights from a trainer to the rollout engines."""
