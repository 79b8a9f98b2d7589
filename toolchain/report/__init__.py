"""Reports: report.json (the contract CI and later tools read), report.md (for people), report.png and friends.
One module per task kind writes its sections (`classification`, `generation`); `render` picks the kind from the
JSON; `common` holds what they share (a report's README block, written by toolchain.blocks)."""
