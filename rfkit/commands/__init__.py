"""rfkit subcommands that are not Trainer entry points: ``rfkit sample``, ``rfkit reflow`` and ``rfkit index``."""
