"""`pipeline evaluate`: models on held-out dialogues; metrics, LLM judge, report."""
