"""The data stage: prompts -> validated, PII-scrubbed, regenerated, tokenized conversations."""
