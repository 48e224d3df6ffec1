"""What users run: the CLI, the Python API, the demo, and the web viewer."""
