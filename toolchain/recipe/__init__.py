"""Recipes: `schema` (the typed sections, a help text per field), `load` (YAML, overrides, checks), `keys` (duplicate
keys and the name/file rule)."""
