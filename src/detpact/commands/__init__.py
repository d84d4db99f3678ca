"""The entry layer: one module per CLI verb, each a plain function the CLI and the API share."""
