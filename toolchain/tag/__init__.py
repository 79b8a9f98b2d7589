"""Token classification helpers: training on word-aligned tags, entity-level metrics."""
