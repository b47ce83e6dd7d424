"""rfkit subcommands that are not Trainer entry points: ``rfkit sample`` and ``rfkit reflow``."""
