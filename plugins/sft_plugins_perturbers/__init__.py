"""First-party perturbers, registered through the public hooks like any third-party plugin."""
