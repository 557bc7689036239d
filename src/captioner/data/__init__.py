"""Caption data: readers, the synthetic generator, the tokenizer and image preprocessing."""
