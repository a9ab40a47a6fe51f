"""First-party collators, registered through the public hooks like any third-party plugin."""
