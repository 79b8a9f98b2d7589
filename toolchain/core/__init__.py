"""What every task shares and no task knows: content-addressed artifacts and their store, the run context, the run
lock, lineage, provenance, fault injection, the run log, distributed helpers and the one stage registry."""
