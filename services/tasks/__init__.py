"""TaskService: summarize, answer, classify and evaluate on top of the tokenizer and inference services."""
