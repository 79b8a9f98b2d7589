"""Cross-encoder helpers: training on (text, text_pair) rows, classification or regression."""
