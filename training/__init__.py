"""training: data, tokenizers, training loops and the command line."""
