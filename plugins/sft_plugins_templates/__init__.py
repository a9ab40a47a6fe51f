"""First-party templates, registered through the public hooks like any third-party plugin."""
