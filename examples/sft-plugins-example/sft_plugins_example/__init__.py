"""An example third-party plugin for sft-plugins.

``plugin`` registers a chat template (``example-chat``) and a noise strategy (``laplace``) and
teaches auto-detection to recognise the template; ``trainer`` subclasses ``SFTPluginTrainer``.
"""
