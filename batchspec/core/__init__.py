"""Use cases and the pure plan: plan, reconcile steps, sharding, budgets, moves, saved plans."""
