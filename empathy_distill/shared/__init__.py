"""What both stages agree on: config models, the shard schema and manifest, prompts, readers."""
