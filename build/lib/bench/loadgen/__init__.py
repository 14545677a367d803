"""Load generation and comparison: open-loop traffic through the openai client, policies side by side."""
