"""One module per task (toolchain.core.task.Task): `classification` (a text classifier) and `generation` (a decoder
that answers with label words). A task module registers itself and imports its stage modules; tasks never import
each other."""
