"""The state store and audit log: runs, events, resources, generations, batches, ledger, lock."""
