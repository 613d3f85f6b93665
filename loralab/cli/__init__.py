"""The `loralab` command line."""
