"""Built-in plugins, registered exactly as a third-party plugin would be."""
