"""An example third-party plugin for sft-plugins.

``plugin`` registers two chat templates (``example-chat``, and ``example-reasoner`` from
``reasoner``, a family with reasoning and tool calls) and a noise strategy (``laplace``), and
teaches auto-detection to recognise the templates; ``trainer`` subclasses ``SFTPluginTrainer``.
"""
