"""One registered stage per module. A stage gets its run context, its call (config, input keys, identity), its
inputs' artifacts and an empty folder to write; what it returns goes into the lineage. The helpers it uses live in
finetune/, compile/, evaluate/ and llm/."""
