"""Every configuration dataclass, option list and default, and the model file's schema: the one place the CLI, training and prediction read them from."""
