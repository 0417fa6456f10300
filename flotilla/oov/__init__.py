"""A closed-vocabulary word LM with a character-aware encoder, and per-user out-of-vocabulary adapters."""
