"""Built-in tasks: small self-contained worlds (data, base model, reward model) shipped in the package."""
