"""Recovery: host snapshots of the training state, the rollback trigger and the rollback itself."""
