"""Command-line entry points: `linkd` (the daemon) and `linkctl` (the operator's tool)."""
